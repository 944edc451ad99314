#!/usr/bin/env bash
# GPU smoke test (benchmarks/gpu_smoke.py): a few ViT-B training steps (cached and uncached), ONNX
# parity on onnxruntime's CUDA provider, encoder/decoder latency, peak GPU memory, one table.
# < 5 min on one GPU; on a machine without a GPU it prints "no GPU: skipped" and exits 0.
#   bash benchmarks/gpu_smoke.sh [--steps 3] [--repeats 10] [--out gpu_smoke.md]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" benchmarks/gpu_smoke.py "$@"
