#!/usr/bin/env bash
# Run the tests (`make test` is `tests/services.sh .venv/bin/python -m pytest ...`) with the services
# they need, and stop at the end whatever the tests started, also when they fail or are interrupted.
#
#   tests/services.sh COMMAND...       exits with COMMAND's status
#
# Before: as root on a Debian/Ubuntu machine, installs Debian's packages where missing (a no-op once
#   there): SLURM, munge and MariaDB (slurm/cluster/start.sh --install), docker.io and debootstrap
#   (docker/engine.sh install). Elsewhere it says what is missing; the tests that need it then fail
#   with a message naming the command that provides it (never a skip).
# During: the tests' session fixtures start what a test needs when it first needs it: the local SLURM
#   cluster (tests/slurm_cluster.py) and the private Docker engine plus the debootstrapped base image
#   (tests/test_container.py); each stops what it started at the end of the session.
# After: a pytest that was killed (a timeout, SIGTERM, a second Ctrl-C) cannot run its teardown, so
#   this stops, by pid, the cluster that a test session started (DIR/started says pytest, no session
#   holds DIR/users.lock, HHDPO_SLURM_KEEP unset) and the private engine when it was not running
#   before. A cluster or engine that a person started is used and left running.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SLURM_DIR=${HHDPO_SLURM_DIR:-/tmp/hhdpo-slurm}
ENGINE=$REPO/docker/engine.sh
ENGINE_DIR=$(dirname "$("$ENGINE" host | sed 's|^unix://||')")

say() { echo "services.sh: $*" >&2; }

if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    "$REPO/slurm/cluster/start.sh" --install || say "installing SLURM failed; the SLURM tests will fail"
    "$ENGINE" install || say "installing docker.io failed; the container tests will fail"
else
    missing=()
    for c in munged slurmctld slurmd slurmdbd mariadbd; do command -v "$c" >/dev/null || missing+=("$c"); done
    ((${#missing[@]})) && say "no ${missing[*]}: the SLURM tests will fail (as root: slurm/cluster/start.sh --install)"
    [[ $(id -u) == 0 ]] || say "not root: the SLURM tests and a private Docker engine need root"
    [[ -n ${DOCKER_HOST:-} ]] || command -v dockerd >/dev/null ||
        say "no dockerd and no DOCKER_HOST: the container tests will fail (as root: docker/engine.sh install)"
fi

engine_up() { [[ -S $ENGINE_DIR/docker.sock ]] && DOCKER_HOST=unix://$ENGINE_DIR/docker.sock docker version >/dev/null 2>&1; }
engine_was_up=0
engine_up && engine_was_up=1

# shellcheck disable=SC2317  # reached through the EXIT trap
cleanup() {
    trap - EXIT INT TERM HUP
    # a killed pytest's workers may take a moment to exit and drop their locks
    if [[ -z ${HHDPO_SLURM_KEEP:-} && $(cat "$SLURM_DIR/started" 2>/dev/null) == pytest ]]; then
        flock -w 30 -x "$SLURM_DIR/users.lock" "$REPO/slurm/cluster/stop.sh" "$SLURM_DIR" ||
            say "left the SLURM cluster in $SLURM_DIR running (in use, or stop.sh failed)"
    fi
    if ((!engine_was_up)) && [[ -e $ENGINE_DIR ]]; then
        flock -w 30 "$ENGINE_DIR.lock" "$ENGINE" stop || say "left the Docker engine in $ENGINE_DIR (in use, or stop failed)"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

"$@"
rc=$?
exit "$rc"
