#!/usr/bin/env bash
# The whole test suite: lint, format, types, then pytest (extra arguments go to pytest).
# Each step stops the script on failure (set -e from _setup.sh; no `&&` chains, which it ignores).
source "$(dirname "$0")/_setup.sh"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== dg check defs"
# The project's definitions load as `dg` loads them: the defs/ folder and its component's YAML.
DAGSTER_HOME="$(mktemp -d)" sh -c 'cp dagster.yaml "$DAGSTER_HOME/" && dg check defs'
echo "== pytest"
python -m pytest "$@"
