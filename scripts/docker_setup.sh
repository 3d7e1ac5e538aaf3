#!/usr/bin/env bash
# A Docker engine and the moemesh base image on this machine, idempotent (run as root):
#   1. Debian's docker.io, docker-compose (the v1 CLI that reads the compose spec) and debootstrap,
#      installed when missing;
#   2. dockerd started in the background when no engine answers (log: $MOEMESH_DOCKERD_LOG), then a
#      bounded wait for `docker info`;
#   3. the base image (Debian bookworm minbase + python3 and venv, made with debootstrap from the
#      Debian mirror this host's apt sources name, then `docker import`), built only when its tag is
#      absent. compose/Dockerfile builds on it with BASE=$MOEMESH_BASE_IMAGE (no registry needed).
# Every step is skipped when its result is already there, so running it twice costs seconds.
set -euo pipefail

BASE_IMAGE="${MOEMESH_BASE_IMAGE:-moemesh-base:bookworm}"
DOCKERD_LOG="${MOEMESH_DOCKERD_LOG:-/var/log/moemesh-dockerd.log}"
ENGINE_WAIT_S="${MOEMESH_ENGINE_WAIT_S:-90}"
SUITE=bookworm
PACKAGES_IN_BASE=python3,python3-venv,ca-certificates

log() { printf '[docker_setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "needs root (installs packages, starts dockerd)"; exit 1
    fi
}

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -eq 0 ]; then
        log "packages present"; return
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -q >/dev/null
    timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

start_engine() {
    if engine_answers; then
        log "engine answers"; return
    fi
    log "starting dockerd (log: $DOCKERD_LOG)"
    nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local waited=0
    until engine_answers; do
        if [ "$waited" -ge "$ENGINE_WAIT_S" ]; then
            log "no engine after ${ENGINE_WAIT_S}s; last lines of $DOCKERD_LOG:"; tail -n 20 "$DOCKERD_LOG" >&2
            exit 1
        fi
        sleep 1; waited=$((waited + 1))
    done
    log "engine up after ${waited}s"
}

# The first Debian mirror this host's apt sources list for the suite (one-line or deb822 format).
debian_mirror() {
    local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
    local existing=()
    for f in "${files[@]}"; do [ -f "$f" ] && existing+=("$f"); done
    [ ${#existing[@]} -gt 0 ] || return 0
    awk -v suite="$SUITE" '
        /^[[:space:]]*#/ { next }
        $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                      if ($(i + 1) == suite) { print $i; exit } next }
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && uri != "") { print uri; exit } }
        /^[[:space:]]*$/ { uri = "" }
    ' "${existing[@]}" | head -n 1
}

build_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present"; return
    fi
    local mirror root
    mirror="$(debian_mirror)"
    if [ -z "$mirror" ]; then
        log "no Debian $SUITE mirror in /etc/apt/sources.list*"; exit 1
    fi
    root="$(mktemp -d /var/tmp/moemesh-base.XXXXXX)"
    trap 'rm -rf "$root"' RETURN
    log "debootstrap --variant=minbase $SUITE from $mirror"
    timeout 900 debootstrap --variant=minbase --include="$PACKAGES_IN_BASE" "$SUITE" "$root" "$mirror" \
        >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; exit 1; }
    rm -f "$root.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    log "docker import as $BASE_IMAGE"
    tar -C "$root" -c . | docker import - "$BASE_IMAGE" >/dev/null
}

need_root
install_packages
start_engine
build_base_image
log "ready: engine $(docker version --format '{{.Server.Version}}'), base image $BASE_IMAGE"
