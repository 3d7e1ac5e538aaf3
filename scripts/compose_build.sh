#!/usr/bin/env bash
# The moemesh image on a machine without a registry or a package index reachable from containers:
# the host downloads every wheel the image needs (its own pip configuration: mirrors, the local
# wheel cache that holds torch's CPU wheel) into compose/wheels, then compose/Dockerfile builds on the
# debootstrap base image (scripts/docker_setup.sh) and installs them with --no-index.
#   scripts/compose_build.sh [TAG]     (default moemesh:local; MOEMESH_BASE_IMAGE names the base)
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${1:-moemesh:local}"
BASE_IMAGE="${MOEMESH_BASE_IMAGE:-moemesh-base:bookworm}"
PY="${PYTHON:-.venv/bin/python}"
WHEELS=compose/wheels

log() { printf '[compose_build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# The project's dependencies (pyproject.toml), its build backend, and grpcio-tools for the stubs.
requirements() {
    "$PY" - <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
for requirement in project["build-system"]["requires"] + project["project"]["dependencies"]:
    print(requirement)
print("grpcio-tools==1.85.1")
PYEOF
}

log "downloading wheels into $WHEELS"
mapfile -t reqs < <(requirements)
timeout 600 "$PY" -m pip download -q --only-binary=:all: --dest "$WHEELS" "${reqs[@]}"
log "building $TAG on $BASE_IMAGE ($(du -sh "$WHEELS" | cut -f1) of wheels)"
DOCKER_BUILDKIT=0 timeout 900 docker build -q -f compose/Dockerfile --build-arg BASE="$BASE_IMAGE" \
    --build-arg WHEELS="$WHEELS" -t "$TAG" . >/dev/null
log "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}'))"
