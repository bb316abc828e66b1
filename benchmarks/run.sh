#!/usr/bin/env bash
# Runs the side-by-side benchmarks and appends the results to benchmarks/RESULTS.md.
# On a GPU machine: CUDA kernels, fp32/fp16/bf16, bert-base and MiniLM training steps.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m minift.cli bench --results benchmarks/RESULTS.md "$@"
