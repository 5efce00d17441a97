#!/usr/bin/env bash
# Create or refresh .venv for `make test` / `make demo` on a clean machine.
# - .venv is rebuilt from scratch when constraints.txt (the lock for this environment) changes;
# - the package is re-installed (editable, with the test extras, which include ruff and mypy for `make lint`) when
#   pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "bootstrap: Python 3.11+ is required (set PYTHON=...)" >&2; exit 1; }

lock_hash=$(sha256sum constraints.txt | cut -c1-16)
install_hash=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.lock-hash" 2>/dev/null)" != "$lock_hash" ]; then
  echo "bootstrap: creating $VENV with $($PYTHON --version) (lock $lock_hash)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  echo "$lock_hash" > "$VENV/.lock-hash"
fi
if [ "$(cat "$VENV/.install-hash" 2>/dev/null)" != "$install_hash" ]; then
  echo "bootstrap: installing detection-trainer[test] into $VENV (a few minutes the first time)" >&2
  # --no-compile: byte-compiling all ~21,000 modules up front costs about 100 CPU-seconds on 2 cores; Python
  # compiles (and caches) only the modules a command imports, on first import.
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-compile \
      --constraint constraints.txt --editable '.[test]' > "$VENV/pip-install.log" 2>&1; then
    tail -n 40 "$VENV/pip-install.log" >&2
    echo "bootstrap: pip install failed; full log in $VENV/pip-install.log" >&2
    exit 1
  fi
  echo "$install_hash" > "$VENV/.install-hash"
fi
