#!/usr/bin/env bash
# Regenerate the checked-in Python stubs from jaxinfer.proto (needs grpcio-tools: pip install -e ".[test]").
# The generated code requires protobuf >= the generator's version and grpcio >= the plugin's version;
# pyproject.toml pins both accordingly: bump the pins when regenerating with a newer grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. jaxinfer.proto
# protoc writes an absolute import of the message module; make it package-relative.
sed -i 's/^import jaxinfer_pb2 as /from . import jaxinfer_pb2 as /' jaxinfer_pb2_grpc.py
