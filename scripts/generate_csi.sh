#!/bin/sh
# Regenerate modelfs/csi/csi_pb2.py and its type stub from modelfs/csi/csi.proto, with the
# protoc that grpcio-tools bundles (a test extra). tests/test_csi_proto.py fails if they differ.
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-modelfs/csi}"
"$PYTHON" -m grpc_tools.protoc -Imodelfs/csi --python_out="$OUT" --pyi_out="$OUT" modelfs/csi/csi.proto
