#!/usr/bin/env bash
# The product on the bundled simulator: the simulator on 127.0.0.1:8765 and the Dagster UI on
# http://127.0.0.1:3000, with a Dagster instance in .dagster_home/. Ctrl-C stops both.
source "$(dirname "$0")/_setup.sh"
export DAGSTER_HOME="$ROOT/.dagster_home"
mkdir -p "$DAGSTER_HOME"
cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"
SIM_PORT="${MATCHALL_SIM_PORT:-8765}"
matchall simulator --port "$SIM_PORT" &
sim_pid=$!
trap 'kill $sim_pid 2>/dev/null || true' EXIT
export ACTIVECAMPAIGN_API_URL="http://127.0.0.1:$SIM_PORT"
export ACTIVECAMPAIGN_API_KEY="${MATCHALL_SIM_TOKEN:-simulator-token}"
# `dg dev` (the UI, the daemon and the code server) on the project's one code location: the
# components in matchall_dagster/defs. From DAGSTER_HOME, so that Dagster does not warn about the
# repository's dagster.yaml; `dagster dev -w workspace.yaml` runs the same.
cd "$DAGSTER_HOME"
dg dev -w "$ROOT/workspace.yaml" -h 127.0.0.1 -p "${DAGSTER_PORT:-3000}"
