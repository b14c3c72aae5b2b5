#!/usr/bin/env bash
# Regenerates sluice.v1 (Python, gRPC stubs and mypy stubs) from proto/ with the pinned
# grpcio-tools and mypy-protobuf of the lock file. CI runs it and fails on any diff.
set -euo pipefail
cd "$(dirname "$0")/.."
out=libs/client/src
pkg=$out/sluice/v1
py=${PYTHON:-.venv/bin/python}
rm -f "$pkg"/*_pb2*.py "$pkg"/*_pb2*.pyi
mkdir -p "$pkg"
# shellcheck disable=SC2046
"$py" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" \
  $(cd proto && find sluice -name '*.proto' | sort)
printf '"""Generated from proto/sluice/v1 by scripts/gen_protos.sh; do not edit."""\n' >"$pkg/__init__.py"
touch "$pkg/py.typed"
