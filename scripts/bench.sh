#!/usr/bin/env bash
# The benchmark suite (not part of ./scripts/test.sh): matchall-dagster against the account's
# floor, a plain httpx loop and dlt, side by side. About 25 minutes on 2 cores for the full matrix.
#   ./scripts/bench.sh                        # 100,000 / 1,000,000 / 10,000,000 members
#   ./scripts/bench.sh --quick                # 100,000 and 1,000,000 members, no parallel runs
#   ./scripts/bench.sh --sizes 1000000 --latencies 400 --tools ours,loop
#   ./scripts/bench.sh --profile              # pyinstrument: the client read and the whole path
#   ./scripts/bench.sh --sizes 1000000 --latencies 400 --tools whole --stores duckdb,postgresql --no-parallel
#                                             # the whole path with each membership store, side by side
# The membership store alone, DuckDB against PostgreSQL at 10,000,000 members (about 4 minutes):
#   .venv/bin/python -m benchmarks.store      # benchmarks/results/store-10m.json and .md
# Results: benchmarks/results/latest.json and latest.md (other paths with --output FILE.json).
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
if ! .venv/bin/python -c 'import dlt, pyinstrument' 2>/dev/null; then
  echo "Installing the bench extra (dlt, pyinstrument) into .venv..." >&2
  .venv/bin/python -m pip install --quiet -e ".[dev,bench]"
fi
args=()
for arg in "$@"; do
  case "$arg" in
    --quick) args+=(--sizes 100000,1000000 --no-parallel) ;;
    --profile) exec .venv/bin/python -m benchmarks.profile ;;
    *) args+=("$arg") ;;
  esac
done
exec .venv/bin/python -m benchmarks.run "${args[@]}"
