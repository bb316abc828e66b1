#!/usr/bin/env bash
# Sets up everything the tests need, then runs them:  bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec "${PYTHON:-python3}" -m pytest -q "$@" tests
