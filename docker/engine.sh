#!/usr/bin/env bash
# A private Docker engine for CI and the container tests (root only; Debian's docker.io).
#   docker/engine.sh install apt-get install Debian's docker.io and debootstrap (once per machine;
#                            a no-op when both are there)
#   docker/engine.sh start   start dockerd (idempotent); prints `export DOCKER_HOST=...`
#   docker/engine.sh stop    stop dockerd by pid, then delete its state: images, build cache and all
#                            (the data root in the background, renamed out of the way first)
#   docker/engine.sh host    print the DOCKER_HOST value
# Everything (data root, exec root, socket, pid file, log) lives under $HHDPO_ENGINE_DIR, so
# it never touches a system engine. No iptables and no bridge: these machines allow neither;
# builds use --network=host to reach the package registries and containers run without network.
set -euo pipefail

# One engine per checkout: a stop here must never end the engine of another checkout's CI run.
REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${HHDPO_ENGINE_DIR:-/tmp/hhdpo-engine-$(printf %s "$REPO" | cksum | cut -d' ' -f1)}
SOCK=$DIR/docker.sock
PIDFILE=$DIR/dockerd.pid
HOST=unix://$SOCK
# The dockerd package's own client matches the daemon's API; any newer client also works.
DOCKER_CLI=${DOCKER_CLI:-docker}

running() { [[ -S $SOCK ]] && DOCKER_HOST=$HOST "$DOCKER_CLI" version >/dev/null 2>&1; }

# The pids of the dockerd processes on this data root, found by command line rather than read from
# the pid file: a stale pid file could name a reused pid, and a daemon that lost its pid file must
# not outlive the directory it writes to.
daemon_pids() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
        if [[ $cmd =~ ^(/usr/s?bin/)?dockerd\  && $cmd == *" --data-root $DIR/data "* ]]; then echo "${p#/proc/}"; fi
    done
}

# docker.io: dockerd, containerd, runc and the 20.10 client, whose built-in BuildKit builds the
# Dockerfile (a newer client needs the buildx plugin); debootstrap: `make base-image`
PACKAGES=(docker.io debootstrap)
# shellcheck source=docker/apt-install.sh
source "$REPO/docker/apt-install.sh"

install() { apt_install engine.sh "${PACKAGES[@]}" || exit 1; }

start() {
    if running; then echo "export DOCKER_HOST=$HOST"; return; fi
    if [[ -n $(daemon_pids) ]]; then
        echo "engine.sh: a dockerd on $DIR is alive but does not answer; run $0 stop first" >&2
        exit 1
    fi
    command -v dockerd >/dev/null || { echo "engine.sh: dockerd not found; run $0 install" >&2; exit 1; }
    mkdir -p "$DIR"
    rm -f "$SOCK" "$PIDFILE"
    # setsid: the engine must not share the caller's process group (a Ctrl-C or a test
    # timeout must not kill it halfway); stop() ends it by pid.
    setsid dockerd --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none \
        --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$PIDFILE" -H "$HOST" \
        --log-level warn >"$DIR/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 120); do
        if running; then echo "export DOCKER_HOST=$HOST"; return; fi
        kill -0 $! 2>/dev/null || break
        sleep 0.5
    done
    echo "engine.sh: dockerd did not start; last lines of $DIR/dockerd.log:" >&2
    tail -n 20 "$DIR/dockerd.log" >&2
    exit 1
}

stop() {
    local pids
    pids=$(daemon_pids)
    if [[ -n $pids ]]; then
        kill -TERM $pids  # dockerd stops its containers and its containerd, then exits
        for _ in $(seq 120); do [[ -n $(daemon_pids) ]] || break; sleep 0.5; done
        pids=$(daemon_pids)
        if [[ -n $pids ]]; then
            echo "engine.sh: dockerd $pids ignored SIGTERM for 60 s; killing it" >&2
            kill -KILL $pids 2>/dev/null || true
            sleep 1
        fi
        if [[ -n $(daemon_pids) ]]; then
            echo "engine.sh: dockerd $(daemon_pids) still running; $DIR left in place" >&2
            exit 1
        fi
    fi
    # A killed dockerd can leave its overlay mounts behind; rm -rf cannot delete through them.
    grep -o " $DIR/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    # Every image, container and cache this engine built lives in its data root: remove it all
    # (only the paths this script made, whatever HHDPO_ENGINE_DIR points at). Deleting the ~10^5
    # files of the images takes minutes on a small machine, so the data root is renamed away at
    # once (a start after this finds a clean $DIR) and deleted by a detached rm.
    local trash=""
    if [[ -d $DIR/data ]]; then
        trash=$(mktemp -d "$DIR.deleting.XXXXXX")
        mv "$DIR/data" "$trash/"
    fi
    rm -rf "$DIR/exec" "$SOCK" "$PIDFILE" "$DIR/dockerd.log"
    rmdir "$DIR" 2>/dev/null || true
    if [[ -n $trash ]]; then setsid rm -rf "$trash" </dev/null >/dev/null 2>&1 & fi
}

case ${1:-} in
    install) install ;;
    start) start ;;
    stop) stop ;;
    host) echo "$HOST" ;;
    *) echo "usage: $0 install|start|stop|host" >&2; exit 2 ;;
esac
