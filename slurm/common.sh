# shellcheck shell=bash
# Shared by slurm/*.sbatch and slurm/pipeline.sh (sourced, never run). The logic that needs the
# config (run directory, completion markers, timeout vs preemption) is in hhdpo/slurm.py.

# hhdpo_find_bin REPO: set HHDPO_BIN to the bin directory holding `hhdpo` and its python. A job
# gets the environment sbatch was called from (PATH included), so an activated venv or conda env
# wins; else the checkout's .venv; HHDPO_BIN set by hand wins over both.
hhdpo_find_bin() {
    local exe
    if [[ -z ${HHDPO_BIN:-} ]]; then
        if exe=$(command -v hhdpo); then
            HHDPO_BIN=$(dirname "$exe")
        elif [[ -x $1/.venv/bin/hhdpo ]]; then
            HHDPO_BIN=$1/.venv/bin
        else
            echo "hhdpo not found on PATH nor in $1/.venv: activate the environment hhdpo is installed in" \
                "before sbatch (it is exported to the job), or set HHDPO_BIN" >&2
            exit 2
        fi
    fi
    if [[ ! -x $HHDPO_BIN/hhdpo || ! -x $HHDPO_BIN/python ]]; then
        echo "HHDPO_BIN=$HHDPO_BIN holds no hhdpo and python" >&2
        exit 2
    fi
    HHDPO_PY=$HHDPO_BIN/python
    export HHDPO_BIN HHDPO_PY
}

# hhdpo_job_init REPO STAGE ARGS...: inside a job. Finds hhdpo, sets the run's paths (run_dir,
# attempt_log) through `python -m hhdpo.slurm job-start`, which exits 2 on a bad config or stale
# upstream outputs before anything runs, and removes this stage's and later stages' markers.
hhdpo_job_init() {
    local repo=$1 out rc
    shift
    hhdpo_find_bin "$repo"
    # a hung rank prints every thread's stack on SIGABRT/SIGSEGV; logs appear line by line
    export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
    out=$("$HHDPO_PY" -m hhdpo.slurm job-start "$@")
    rc=$?
    if ((rc != 0)); then
        echo "[slurm] $1: not started (exit $rc)" >&2
        exit "$rc"
    fi
    # job-start prints shell-quoted assignments of these
    run_dir="" attempt_log="" cleared=""
    eval "$out"
    hhdpo_log "$1: job ${SLURM_JOB_ID:-?} attempt ${SLURM_RESTART_COUNT:-0} on $(hhdpo_hosts) (run_dir $run_dir)"
    if [[ -n ${cleared:-} ]]; then
        hhdpo_log "completion markers removed: $cleared (this stage's outputs are about to change)"
    fi
}

# hhdpo_threads N: OMP_NUM_THREADS=N, the CPUs SLURM gave each process, unless the environment sets
# it: torch otherwise starts a thread per core of the node, which spin against each other on a
# shared node (3-4x slower generation measured on the test cluster)
hhdpo_threads() {
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$1}
}

# the job's nodes one by one (n1,n2), not SLURM's compressed list (n[1-2])
hhdpo_hosts() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | paste -sd, -
}

# hhdpo_log MESSAGE: to the job's output and this attempt's log
hhdpo_log() {
    printf '[slurm %(%F %T)T] %s\n' -1 "$*" | tee -a "${attempt_log:-/dev/null}"
}

# hhdpo_run COMMAND...: run it with its output (stdout and stderr) also in this attempt's log;
# returns its exit status
hhdpo_run() {
    "$@" 2>&1 | tee -a "$attempt_log"
    return "${PIPESTATUS[0]}"
}

# hhdpo_job_done STAGE ARGS...: the stage's completion marker, with its config hash
hhdpo_job_done() {
    hhdpo_run "$HHDPO_PY" -m hhdpo.slurm job-done "$@"
}
