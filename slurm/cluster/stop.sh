#!/usr/bin/env bash
# Stop the local SLURM cluster that slurm/cluster/start.sh started in DIR: cancel its jobs, stop
# its daemons by the pid files in DIR (SIGTERM, wait, then SIGKILL), and remove DIR's line from
# /etc/hosts. A no-op when nothing runs there. The logs stay in DIR/log; the next start wipes the rest.
#
#   slurm/cluster/stop.sh [DIR]      DIR defaults to $HHDPO_SLURM_DIR or /tmp/hhdpo-slurm
set -euo pipefail

case ${1:-} in
    -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    -*) echo "stop.sh: unknown option $1" >&2; exit 2 ;;
esac
DIR=${1:-${HHDPO_SLURM_DIR:-/tmp/hhdpo-slurm}}
case $DIR in
    /*) ;;
    *) DIR=$PWD/$DIR ;;
esac
DIR=${DIR%/}
if [[ -z $DIR || $DIR == / || $DIR =~ [[:space:]] ]]; then
    echo "stop.sh: bad cluster directory '$DIR'" >&2
    exit 2
fi
CONF=$DIR/etc/slurm.conf
RUN=$DIR/run
HOSTS_TAG="# hhdpo-slurm $DIR"

clean_hosts() {
    # Rewrite in place (not sed -i): /etc/hosts is often a bind mount that cannot be replaced.
    if grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
        local rest
        rest=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
        printf '%s\n' "$rest" >/etc/hosts
    fi
}

if [[ ! -d $DIR ]]; then
    clean_hosts
    exit 0
fi
exec 9>"$DIR/lock"
flock 9

pid_of() { # pid_of FILE NAME: the pid in FILE if that process is running and is NAME
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

stop_pids() { # stop_pids SECONDS PID...: SIGTERM, wait up to SECONDS, then SIGKILL
    local limit=$1 pid end
    shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    end=$((SECONDS + limit))
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop.sh: $pid did not exit in $limit s; SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

descendants() { # descendants PID: every process below PID
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

# 1. Cancel the cluster's jobs while the daemons still run, and wait for them to end.
if [[ -f $CONF ]] && pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    export SLURM_CONF=$CONF
    # (timeouts: the clients retry for a long while when slurmctld is going away)
    timeout 10 scancel --partition=debug 2>/dev/null || true
    end=$((SECONDS + 20))
    while [[ -n $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < end)); do sleep 0.2; done
fi

# 2. slurmd and slurmctld, by their pid files.
pids=()
for entry in slurmd-n1:slurmd slurmd-n2:slurmd slurmctld:slurmctld; do
    if pid=$(pid_of "$RUN/${entry%%:*}.pid" "${entry#*:}"); then pids+=("$pid"); fi
done
stop_pids 30 "${pids[@]}"

# 3. Job steps that outlived their slurmd (their slurmstepd carries this cluster's SLURM_CONF).
for stepd in $(pgrep -x slurmstepd || true); do
    if tr '\0' '\n' <"/proc/$stepd/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
        mapfile -t tree < <(descendants "$stepd")
        kill -KILL "$stepd" "${tree[@]}" 2>/dev/null || true
    fi
done

# 4. slurmdbd, MariaDB and munged together: nothing needs them any more.
pids=()
for entry in run/slurmdbd.pid:slurmdbd mysql/mariadbd.pid:mariadbd munge/munged.pid:munged; do
    if pid=$(pid_of "$DIR/${entry%%:*}" "${entry#*:}"); then pids+=("$pid"); fi
done
stop_pids 60 "${pids[@]}"

rm -f "$RUN"/*.pid "$DIR/started" "$DIR/env"
clean_hosts
echo "slurm cluster: stopped ($DIR)" >&2
