#!/usr/bin/env bash
# llama.cpp peer environment for bench/decode.py (--llamacpp-venv DIR): prebuilt llama.cpp libraries from
# PyPI's llama-cpp-py-sync wheel (no compile step), in their own virtual environment.
set -euo pipefail
VENV="${1:-.venv-llamacpp}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --only-binary=:all: "llama-cpp-py-sync==0.11739"
