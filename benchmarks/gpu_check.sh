#!/usr/bin/env bash
# Every GPU check in one go (benchmarks/gpu_check.py): correctness on the device, calibration,
# Llama-3-8B (random weights, bf16, batch 8, prompt 2048, 32 tokens) under five policies, replayed
# on the calibrated profile, and a request stream served live against the serving simulator. Results (JSON, traces, a plot) under benchmarks/results/gpu-check/.
# Uses the torch already installed; downloads nothing. `--device cpu --tiny` is the dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
start=$(date +%s)
"$PYTHON" benchmarks/gpu_check.py "$@"
echo "gpu_check: $(( $(date +%s) - start )) s" >&2
