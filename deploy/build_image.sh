#!/usr/bin/env bash
# The Dockerfile's steps, run without a Docker engine: the same files copied, the same wheel
# built, the same packages installed into a fresh virtualenv, then the image's entry point started
# and asked whether it serves the code location (the chart's readiness probe is the same
# `dagster api grpc-health-check`).
#
#   deploy/build_image.sh               # in a temporary folder, removed at the end
#   deploy/build_image.sh --keep DIR    # in DIR (created), kept: DIR/venv is the image's Python
#
# Needs the Python of the Dockerfile's PYTHON_VERSION (python3.11, or PYTHON=/path/to/python3.11)
# and PyPI. Not reproduced: the base image's Debian, the non-root user (USER 10001), EXPOSE;
# those need a Docker engine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERFILE="$ROOT/Dockerfile"
MODULE="matchall_dagster.definitions"

dockerfile_arg() {  # the default of `ARG NAME=value` in the Dockerfile
  local value
  value="$(sed -n "s/^ARG $1=//p" "$DOCKERFILE")"
  [ -n "$value" ] || { echo "Error: the Dockerfile has no 'ARG $1=...' line." >&2; exit 1; }
  printf '%s' "$value"
}

PYTHON_VERSION="$(dockerfile_arg PYTHON_VERSION)"
DAGSTER_K8S_VERSION="$(dockerfile_arg DAGSTER_K8S_VERSION)"
PYTHON="${PYTHON:-python$PYTHON_VERSION}"

keep=""
case "${1:-}" in
  "") ;;
  --keep)
    [ -n "${2:-}" ] || { echo "Error: --keep needs a folder: deploy/build_image.sh --keep DIR" >&2; exit 2; }
    keep="$2" ;;
  *) echo "Error: unknown argument '$1'. Usage: deploy/build_image.sh [--keep DIR]" >&2; exit 2 ;;
esac

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "Error: $PYTHON not found. The image runs Python $PYTHON_VERSION (Dockerfile ARG PYTHON_VERSION);" \
    "set PYTHON=/path/to/python$PYTHON_VERSION." >&2
  exit 1
fi
actual="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$actual" != "$PYTHON_VERSION" ]; then
  echo "Error: $PYTHON is Python $actual; the image runs $PYTHON_VERSION. Set PYTHON=/path/to/python$PYTHON_VERSION." >&2
  exit 1
fi

if [ -n "$keep" ]; then
  mkdir -p "$keep"
  PREFIX="$(cd "$keep" && pwd)"
  if [ -n "$(ls -A "$PREFIX")" ]; then
    echo "Error: $PREFIX is not empty; give --keep a new or empty folder." >&2
    exit 1
  fi
else
  PREFIX="$(mktemp -d "${TMPDIR:-/tmp}/matchall-image.XXXXXX")"
fi
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ -z "$keep" ]; then rm -rf "$PREFIX"; fi
}
trap cleanup EXIT

step() { printf '==> %s\n' "$*"; }

# -- build stage: COPY <sources...> <dest> (the build stage's lines; --from lines are the runtime's)
step "copying the build context as the Dockerfile's COPY lines do"
mkdir -p "$PREFIX/src"
while read -r _ words; do
  read -r -a parts <<<"$words"
  dest="${parts[${#parts[@]}-1]}"
  for src in "${parts[@]:0:${#parts[@]}-1}"; do
    if [ "${dest%/}" != "$dest" ] || [ "$dest" = "." ]; then
      target="$PREFIX/src/${dest#./}"
      mkdir -p "$target"
      cp -R "$ROOT/$src" "$target"
    else
      target="$PREFIX/src/${dest#./}"
      mkdir -p "$(dirname "$target")"
      cp -R "$ROOT/$src" "$target"
    fi
  done
done < <(grep -E '^COPY ' "$DOCKERFILE" | grep -v -- '--from=')
# .dockerignore keeps caches out of the context.
find "$PREFIX/src" \( -name '__pycache__' -o -name '*.pyc' \) -prune -exec rm -rf {} +

step "building the wheel (pip wheel --no-deps)"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$PREFIX/dist" "$PREFIX/src"
wheels=("$PREFIX"/dist/matchall_dagster-*.whl)
[ -f "${wheels[0]}" ] || { echo "Error: no matchall_dagster wheel was built in $PREFIX/dist." >&2; exit 1; }

# -- runtime stage
step "installing the wheel and dagster-k8s==$DAGSTER_K8S_VERSION into a fresh virtualenv"
"$PYTHON" -m venv "$PREFIX/venv"
VENV="$PREFIX/venv"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[0]}" \
  "dagster-k8s==$DAGSTER_K8S_VERSION"

mkdir -p "$PREFIX/app" "$PREFIX/dagster_home"
cd "$PREFIX/app"  # the image's empty WORKDIR: nothing importable from the repository

step "checking the installed project: from the wheel, no editable install, no extras"
"$VENV/bin/python" - "$ROOT/pyproject.toml" "$VENV" "$DAGSTER_K8S_VERSION" <<'PY'
import importlib.metadata as metadata
import json
import re
import sys
import tomllib
from pathlib import Path

pyproject, venv, k8s_version = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3]
project = tomllib.loads(pyproject.read_text())["project"]

import matchall_dagster

location = Path(matchall_dagster.__file__).resolve()
assert venv in location.parents, f"matchall_dagster imported from {location}, not from the virtualenv"
direct_url = metadata.distribution("matchall-dagster").read_text("direct_url.json")
if direct_url:
    assert not json.loads(direct_url).get("dir_info", {}).get("editable"), "installed editable"

def name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0]

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What the wheel and dagster-k8s need, followed through the installed packages' own requirements:
# a package of an extra may be here only when that closure needs it too.
needed: dict[str, set[str]] = {}
todo = [Requirement(r) for r in project["dependencies"]] + [Requirement(f"dagster-k8s=={k8s_version}")]
while todo:
    requirement = todo.pop()
    key = canonicalize_name(requirement.name)
    if key in needed and set(requirement.extras) <= needed[key]:
        continue
    needed[key] = needed.get(key, set()) | set(requirement.extras)
    try:
        requires = metadata.requires(requirement.name) or []
    except metadata.PackageNotFoundError:
        continue
    for text in requires:
        nested = Requirement(text)
        if nested.marker is None or any(nested.marker.evaluate({"extra": e}) for e in needed[key] | {""}):
            todo.append(nested)

own = canonicalize_name(project["name"])
extras = {canonicalize_name(name(r)) for group in project["optional-dependencies"].values() for r in group} - {own}
present = []
for extra in sorted(extras - needed.keys()):
    try:
        metadata.version(extra)
        present.append(extra)
    except metadata.PackageNotFoundError:
        pass
assert not present, f"packages of the extras are installed: {present}"
through_core = sorted(extras & needed.keys())

pins = {name(r): r.split("==", 1)[1] for r in project["dependencies"] if "==" in r}
for package, version in pins.items():
    assert metadata.version(package) == version, f"{package} {metadata.version(package)}, pyproject pins {version}"
assert metadata.version("dagster-k8s") == k8s_version
print(f"    matchall-dagster {metadata.version('matchall-dagster')} from {location.parent}")
print(f"    dagster {metadata.version('dagster')}, dagster-k8s {metadata.version('dagster-k8s')}, "
      f"dagster-postgres {metadata.version('dagster-postgres')}; none of {len(extras)} extras' own packages")
if through_core:
    print(f"    of the extras' packages, the core's requirements bring: {', '.join(through_core)}")
PY

step "starting the image's entry point: dagster api grpc -m $MODULE"
port="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
secret() { "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(16))'; }
# The environment the chart gives the code server: DAGSTER_HOME, DAGSTER_CURRENT_IMAGE, the
# PostgreSQL passwords and the API key from Kubernetes secrets (random here), the values' env.
export DAGSTER_HOME="$PREFIX/dagster_home"
export DAGSTER_CURRENT_IMAGE="matchall-dagster:build-check"
DAGSTER_PG_PASSWORD="$(secret)"; export DAGSTER_PG_PASSWORD
PGPASSWORD="$(secret)"; export PGPASSWORD
ACTIVECAMPAIGN_API_KEY="$(secret)"; export ACTIVECAMPAIGN_API_KEY
export ACTIVECAMPAIGN_API_URL="http://127.0.0.1:9"  # loading the code sends no request
# The values' PostgreSQL store, on a closed loopback port: loading the code opens no connection.
export MATCHALL_STORE="postgresql://dagster@127.0.0.1:9/dagster?schema=matchall"
started=$(date +%s.%N)
set -m  # own process group, default signal handling: TERM stops the server at the end
"$VENV/bin/dagster" api grpc -h 127.0.0.1 -p "$port" -m "$MODULE" >"$PREFIX/grpc.log" 2>&1 &
server_pid=$!
set +m
serving=""
for _ in $(seq 1 120); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "Error: the code server exited before serving; its log:" >&2
    cat "$PREFIX/grpc.log" >&2
    exit 1
  fi
  if "$VENV/bin/dagster" api grpc-health-check -h 127.0.0.1 -p "$port" >/dev/null 2>&1; then
    serving=yes
    break
  fi
  sleep 0.5
done
if [ -z "$serving" ]; then
  echo "Error: the code server did not answer the health check within 60 s; its log:" >&2
  cat "$PREFIX/grpc.log" >&2
  exit 1
fi
elapsed="$("$VENV/bin/python" -c "import time; print(f'{time.time() - $started:.1f}')")"
echo "    SERVING on 127.0.0.1:$port after $elapsed s"

step "dagster definitions validate -m $MODULE"
"$VENV/bin/dagster" definitions validate -m "$MODULE" --log-level warning

echo "OK: the Dockerfile's steps build, install and serve $MODULE (prefix $PREFIX${keep:+, kept})"
