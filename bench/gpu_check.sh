#!/usr/bin/env bash
# GPU check of stages 1 and 2 (bench/gpu_check.py), from any directory:
#   bash bench/gpu_check.sh            # on a lent GPU machine: ~1B random-init Llama on CUDA; prints tokens/s, MFU
#                                      # against ~790 TFLOP/s bf16, peak GPU memory, step-0 loss - ln 2
#   bash bench/gpu_check.sh --dry-run  # tiny sizes on the CPU, same code path (tests/test_train_gpu_check.py)
# Python: $PYTHON, else .venv/bin/python, else python3 (a device machine's python3 has torch and transformers).
# Nothing is downloaded and nothing large is committed: the model, pairs and caches are built under bench/work/.
# Where $OUT is set (the device tool's output folder), the figures are also written to $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
extra=()
if [ -n "${OUT:-}" ]; then extra=(--json "$OUT/gpu_check.json"); fi
exec "$PYTHON" bench/gpu_check.py "${extra[@]}" "$@"
