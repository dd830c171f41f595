#!/usr/bin/env bash
# Set up (if needed) and serve FreshLM on its embedded defaults: SQLite + an embedded Redis in
# ./var, SmolLM2-135M-Instruct on the CPU. Settings: FRESHLM_* environment variables (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# python -m from the checkout's root: this checkout's code serves, whichever one the venv was set up from
exec "${FRESHLM_VENV:-.venv}/bin/python" -m service.main
