#!/usr/bin/env bash
# Builds the course site into docs/_build/html: every tutorial executed into a page, the API
# reference from the docstrings, the assignment pages, the benchmark tables.
#   bash scripts/docs.sh            the tutorials at their full sizes (several minutes per training tutorial)
#   bash scripts/docs.sh --fast     their fast sizes (MINIFT_TUTORIAL_FAST=1, as CI builds it)
# Then open docs/_build/html/index.html; the notebooks are in docs/_build/html/notebooks/.
# Installs what the build needs into the current Python (minift itself: bash scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--fast" ]; then export MINIFT_TUTORIAL_FAST=1; fi
"$PY" -m pip install --disable-pip-version-check -q -r docs/requirements.txt

# MathJax 3 from the npm registry, served by the site itself: math renders with no network.
MJ=.cache/docs-npm/node_modules/mathjax
if [ ! -f "$MJ/es5/tex-chtml.js" ]; then
  command -v npm >/dev/null || { echo "npm is needed once, to fetch MathJax (Debian: apt-get install npm)" >&2; exit 1; }
  npm install --prefix .cache/docs-npm --no-save --no-audit --no-fund --loglevel=error mathjax@3.2.2
fi
rm -rf docs/_static/mathjax && mkdir -p docs/_static/mathjax/output
cp -r "$MJ/es5/tex-chtml.js" "$MJ/es5/input" "$MJ/es5/ui" "$MJ/es5/a11y" "$MJ/es5/adaptors" docs/_static/mathjax/
cp -r "$MJ/es5/output/chtml" docs/_static/mathjax/output/
cp "$MJ/LICENSE" docs/_static/mathjax/

# The tutorials draw inline in the notebook kernel; an inherited MPLBACKEND=Agg would hide them.
unset MPLBACKEND
# One thread per process on a shared 2-core machine unless told otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# -E: a fresh environment, so that every tutorial executes again (-W: a warning fails the build,
# as does an exception in any tutorial cell).
OUT=${MINIFT_DOCS_OUT:-docs/_build/html}
time "$PY" -m sphinx -E -b html -q -W --keep-going docs "$OUT"
echo "built $OUT/index.html"
