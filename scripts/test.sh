#!/usr/bin/env bash
# The whole test suite: lint, format, types, then pytest (extra arguments go to pytest).
# Each step stops the script on failure (set -e from _setup.sh; no `&&` chains, which it ignores).
source "$(dirname "$0")/_setup.sh"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
python -m pytest "$@"
