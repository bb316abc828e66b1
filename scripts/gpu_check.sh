#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a GPU, a CUDA build of torch and nvcc: build the
# extension with its CUDA kernels, say which mode is active, run the kernel and optimizer tests
# (their CUDA cases run when a GPU is present), then the side-by-side benchmarks, which append
# their table to benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
MAX_JOBS="${MAX_JOBS:-8}" python3 -m pip install --no-build-isolation --no-deps -e .
python3 -m minift.cli doctor
python3 -m pytest -q -rs tests/test_ops.py tests/test_optim.py
bash benchmarks/run.sh
