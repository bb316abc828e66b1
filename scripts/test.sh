#!/usr/bin/env bash
# Sets up everything the tests need, then runs them:  bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Two test processes, one thread each: two cores, no oversubscription. The tests of the course
# site (group "site") share one build, in which the tutorials execute: --dist loadgroup keeps them
# on one worker, which builds it while the other runs the rest.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python3}" -m pytest -q -n 2 --dist loadgroup --durations=40 "$@" tests
