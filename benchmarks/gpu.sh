#!/usr/bin/env bash
# One command for a lent GPU machine: stock Demucs vs Stemset's engine on the release htdemucs
# architecture (random weights), fp32 and bf16 at several batch sizes, on a 4-minute input.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (extra Python packages may be carried as wheels in .whl/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/stemset-gpu}}
mkdir -p "$out"
if ! python3 -c "import demucs" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 benchmarks/gpu_suite.py --seconds "${SECONDS_IN:-240}" --batch-sizes "${BATCH_SIZES:-1,4,8,16,32}" \
  --precisions "${PRECISIONS:-fp32,bf16}" --repeats "${REPEATS:-3}" --out "$out/gpu_suite.json" 2>&1 | tee "$out/gpu_suite.txt"
