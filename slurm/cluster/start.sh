#!/usr/bin/env bash
# A real SLURM cluster on this host, for the tests and for trying the sbatch scripts locally:
# munged, slurmctld and two slurmd (nodes n1 and n2, same host, 127.0.0.1), and slurmdbd on a
# private MariaDB so that sacct (and hence submitit) sees every job's final state.
#
#   slurm/cluster/start.sh --install          apt-get install the Debian packages (once per machine)
#   eval "$(slurm/cluster/start.sh [DIR])"    start (a no-op when already up) and export SLURM_CONF
#   slurm/cluster/stop.sh [DIR]               stop it by the pid files in DIR
#
# Options: --no-accounting   no slurmdbd/MariaDB (starts faster; sacct and submitit do not work)
# Environment: HHDPO_SLURM_DIR (DIR; default /tmp/hhdpo-slurm), HHDPO_SLURM_PORT_BASE (default 17000:
#   slurmd n1/n2 on +1/+2, MariaDB +6, slurmctld +17, slurmdbd +19; another cluster on the same host
#   needs another base), HHDPO_SLURM_STARTED_BY (recorded in DIR/started; the tests' fixture sets it).
#
# Everything (configs, munge key and socket, state, spool, logs, pid files, database) lives in DIR;
# stdout is only the `export ...` lines (also written to DIR/env), progress goes to stderr.
# Needs root: munged runs as user munge, the SLURM daemons and MariaDB as root (SlurmUser=root; jobs
# run as whoever submits them), and /etc/hosts gets the line "127.0.0.1 n1 n2 # hhdpo-slurm DIR" so
# that the node names resolve (torch's rendezvous on n1), which stop.sh removes again.
set -euo pipefail

# procps: pgrep/ps for stop.sh; shellcheck: the tests check the scripts in slurm/
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server mariadb-client procps shellcheck)

install_packages() {
    # shellcheck source=docker/apt-install.sh
    source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/docker/apt-install.sh"
    apt_install "slurm cluster" "${PACKAGES[@]}"
}

accounting=1
dir=""
while (($#)); do
    case $1 in
        --install) install_packages; exit 0 ;;
        --accounting) accounting=1 ;;
        --no-accounting) accounting=0 ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        -*) echo "start.sh: unknown option $1" >&2; exit 2 ;;
        *) dir=$1 ;;
    esac
    shift
done

DIR=${dir:-${HHDPO_SLURM_DIR:-/tmp/hhdpo-slurm}}
case $DIR in
    /*) ;;
    *) DIR=$PWD/$DIR ;;
esac
DIR=${DIR%/}
if [[ -z $DIR || $DIR == / || $DIR =~ [[:space:]] ]]; then
    echo "start.sh: bad cluster directory '$DIR'" >&2
    exit 2
fi
if [[ $(id -u) != 0 ]]; then
    echo "start.sh: needs root (daemons, the munge user, /etc/hosts)" >&2
    exit 1
fi
for cmd in munged slurmctld slurmd sinfo; do
    command -v "$cmd" >/dev/null || { echo "start.sh: $cmd not found; run $0 --install" >&2; exit 1; }
done
if ((accounting)); then
    for cmd in slurmdbd mariadbd mariadb-install-db mariadb-admin; do
        command -v "$cmd" >/dev/null || { echo "start.sh: $cmd not found; run $0 --install" >&2; exit 1; }
    done
fi

BASE=${HHDPO_SLURM_PORT_BASE:-17000}
ETC=$DIR/etc
CONF=$ETC/slurm.conf
RUN=$DIR/run
LOG=$DIR/log
MUNGE=$DIR/munge
SOCK=$MUNGE/munge.socket.2
DB=$DIR/mysql
DBSOCK=$DB/mysqld.sock
HOSTS_TAG="# hhdpo-slurm $DIR"
HOST=$(hostname -s)
export SLURM_CONF=$CONF

t0=${EPOCHREALTIME/./}
say() {
    local ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
    printf 'slurm cluster: %s (%d.%d s)\n' "$*" $((ms / 1000)) $((ms % 1000 / 100)) >&2
}

print_env() {
    printf 'export SLURM_CONF=%s\nexport HHDPO_SLURM_DIR=%s\n' "$CONF" "$DIR" | tee "$DIR/env"
}

pid_alive() { # pid_alive FILE NAME: the process in pid FILE is running and is NAME
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

daemons() { # the pid files and process names that make up the cluster (stop.sh has the same list)
    echo "$RUN/slurmd-n1.pid slurmd"
    echo "$RUN/slurmd-n2.pid slurmd"
    echo "$RUN/slurmctld.pid slurmctld"
    if [[ -e $DIR/accounting ]]; then
        echo "$RUN/slurmdbd.pid slurmdbd"
        echo "$DB/mariadbd.pid mariadbd"
    fi
    echo "$MUNGE/munged.pid munged"
}

nodes_up() {
    local states
    states=$(sinfo -h -N -n n1,n2 -o '%N %T' 2>/dev/null | sort -u) || return 1
    [[ $(grep -cE '^n[12] (idle|mixed|allocated|completing)$' <<<"$states") == 2 ]]
}

cluster_up() {
    [[ -e $DIR/started ]] || return 1
    local f name
    while read -r f name; do pid_alive "$f" "$name" || return 1; done < <(daemons)
    nodes_up
}

wait_for() { # wait_for WHAT SECONDS COMMAND...
    local what=$1 limit=$2 end
    shift 2
    end=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        if (($(date +%s) >= end)); then
            echo "start.sh: $what did not come up in $limit s; logs in $LOG" >&2
            tail -n 20 "$LOG"/* >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
}

mkdir -p "$DIR"
chmod 0755 "$DIR"
# One start/stop at a time per directory; daemons are started with 9>&- so they do not keep the lock.
exec 9>"$DIR/lock"
flock 9

if cluster_up; then
    if ((accounting)) && [[ ! -e $DIR/accounting ]]; then
        echo "start.sh: the cluster in $DIR runs without accounting; stop it first ($(dirname "$0")/stop.sh $DIR)" >&2
        exit 1
    fi
    say "already up in $DIR"
    print_env
    exit 0
fi

# Not (fully) up: stop whatever is left of an earlier cluster in DIR, then start from a clean state.
if [[ -e $DIR/started || -n $(find "$RUN" "$MUNGE" "$DB" -maxdepth 1 -name '*.pid' 2>/dev/null) ]]; then
    flock -u 9
    "$(dirname "$0")/stop.sh" "$DIR" >&2
    flock 9
fi
rm -rf "$ETC" "$RUN" "$LOG" "$MUNGE" "$DB" "$DIR/state" "$DIR/spool" "$DIR/started" "$DIR/accounting" "$DIR/env"
mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE" "$DIR/state" "$DIR/spool"
((accounting)) && touch "$DIR/accounting"

# --- /etc/hosts: n1 and n2 resolve to this host -------------------------------------------------
if ! grep -qF "$HOSTS_TAG" /etc/hosts; then
    echo "127.0.0.1 n1 n2 $HOSTS_TAG" >>/etc/hosts
fi

# --- munged (as user munge; it wants a 0755 socket dir and a 0400 key it owns) --------------------
if ! runuser -u munge -- test -x "$MUNGE"; then
    echo "start.sh: user munge cannot reach $MUNGE (every parent directory needs o+x)" >&2
    exit 1
fi
dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$MUNGE"
chmod 0755 "$MUNGE"
chmod 0400 "$MUNGE/munge.key"
runuser -u munge -- munged --socket="$SOCK" --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" \
    --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" </dev/null >>"$LOG/daemons.out" 2>&1 9>&-
wait_for munged 20 bash -c "munge -n -S '$SOCK' | unmunge -S '$SOCK'"
say "munged up"

# --- slurm.conf ---------------------------------------------------------------------------------
# the CPUs this process may use; nproc would print OMP_NUM_THREADS instead where it is set
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
cat >"$ETC/plugstack.conf" <<EOF
# empty: no SPANK plugins
EOF
cat >"$CONF" <<EOF
# Written by slurm/cluster/start.sh; regenerated on every start.
ClusterName=hhdpo
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$((BASE + 17))
SlurmdPort=$((BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again
AuthInfo=socket=$SOCK,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$ETC/plugstack.conf
MailProg=/bin/true
# several slurmd on one host: no cgroups, processes tracked through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
# batch_sched_delay=0: a job whose dependency just got satisfied starts at once (else ~3 s per link)
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
ReturnToService=2
# #SBATCH --requeue and scontrol requeue work; short kill and purge delays keep the tests quick
JobRequeue=1
KillWait=5
MinJobAge=60
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmdTimeout=300
SlurmctldTimeout=120
EOF
if ((accounting)); then
    cat >>"$CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((BASE + 19))
AccountingStoragePass=$SOCK
JobCompType=jobcomp/none
EOF
fi
cat >>"$CONF" <<EOF
NodeName=DEFAULT CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$((BASE + 1))
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$((BASE + 2))
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF

# --- MariaDB and slurmdbd -----------------------------------------------------------------------
if ((accounting)); then
    mkdir -p "$DB"
    dbopts=(--no-defaults --user=root --skip-name-resolve --skip-log-bin
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-flush-log-at-trx-commit=0
        --innodb-doublewrite=0 --innodb-flush-method=nosync)
    # mariadb-install-db takes ~8 s here; keep a pristine copy for the next start in this DIR
    if [[ ! -d $DIR/mysql-template ]]; then
        rm -rf "$DIR/mysql-template.tmp"
        mariadb-install-db "${dbopts[@]}" --datadir="$DIR/mysql-template.tmp" \
            --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install-db.log" 2>&1 9>&-
        mv "$DIR/mysql-template.tmp" "$DIR/mysql-template"
    fi
    cp -a "$DIR/mysql-template" "$DB/data"
    say "database initialised"
    setsid mariadbd "${dbopts[@]}" --datadir="$DB/data" --socket="$DBSOCK" --port=$((BASE + 6)) --bind-address=127.0.0.1 \
        --pid-file="$DB/mariadbd.pid" --log-error="$LOG/mariadbd.log" </dev/null >>"$LOG/mariadbd.log" 2>&1 9>&- &
    wait_for mariadbd 60 mariadb-admin --no-defaults -S "$DBSOCK" -u root ping
    mariadb --no-defaults -S "$DBSOCK" -u root -e \
        "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'hhdpo'; GRANT ALL ON *.* TO 'slurm'@'127.0.0.1';"
    say "mariadbd up"
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/cluster/start.sh
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$((BASE + 19))
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((BASE + 6))
StorageUser=slurm
StoragePass=hhdpo
StorageLoc=slurm_acct_db
EOF
    chmod 0600 "$ETC/slurmdbd.conf"
    slurmdbd </dev/null >>"$LOG/daemons.out" 2>&1 9>&-
    wait_for slurmdbd 60 sacctmgr -n list cluster
    sacctmgr -i add cluster hhdpo >/dev/null
    say "slurmdbd up"
fi

# --- slurmctld and the two slurmd ---------------------------------------------------------------
slurmctld -f "$CONF" </dev/null >>"$LOG/daemons.out" 2>&1 9>&-
wait_for slurmctld 30 scontrol ping
say "slurmctld up"
for n in n1 n2; do slurmd -f "$CONF" -N "$n" </dev/null >>"$LOG/daemons.out" 2>&1 9>&-; done
wait_for "nodes n1 and n2" 60 nodes_up
# who started it: tests/slurm_cluster.py stops only clusters that a test session started
echo "${HHDPO_SLURM_STARTED_BY:-start.sh}" >"$DIR/started"
say "nodes n1 n2 idle; cluster up in $DIR"
print_env
