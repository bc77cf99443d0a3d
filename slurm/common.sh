# shellcheck shell=bash
# Shared by slurm/*.sbatch and slurm/pipeline.sh (sourced, never run). The logic that needs the
# config (run directory, completion markers, timeout vs preemption) is in hhdpo/launch/slurm.py.
#
# Where a job runs hhdpo (every hhdpo and python call of the job, job-start/job-done included):
#   bare metal (default)   the hhdpo found on PATH, in the checkout's .venv, or in HHDPO_BIN
#   HHDPO_SIF=path.sif     Apptainer: apptainer exec --nv --bind BINDS --pwd $PWD [--env HF_HOME=..] SIF hhdpo
#   HHDPO_IMAGE=image      pyxis: srun --container-image=IMAGE --container-mounts=BINDS --container-workdir=$PWD
#                          [--container-env=HF_HOME]: added to train's own srun; the batch shell's
#                          hhdpo and python calls become one-task steps (pyxis works only under srun).
#                          IMAGE: an enroot URI (nvcr.io#org/hhdpo:tag) or, faster (no download per
#                          step), a squashfs file from `enroot import`.
# Setting both is an error (exit 2), as is a HHDPO_SIF that does not exist.
# BINDS, the same list in both modes, each at the same path inside as outside:
#   the checkout, read-only (configs are read from it); left out when it is the working directory
#     or inside it, which the next bind covers read-write
#   the job's working directory ($PWD: SLURM_SUBMIT_DIR unless sbatch --chdir), read-write
#   $HF_HOME when set (and HF_HOME set to it inside: the image's own HF_HOME wins otherwise)
#   $HHDPO_CACHE when set; HHDPO_CACHE inside is it, else .cache/hhdpo in the working directory
#     (created when missing): an Apptainer image is read-only, so the image's /cache/hhdpo cannot
#     take the reference log-probs; on the host they (and models converted there: SmolLM2 once,
#     from the image's GGUF) outlive the job
#   HHDPO_BINDS: more, comma-separated SRC[:DST[:ro]], SRC absolute
# The run_dir must be under the working directory or, absolute, under a bind with DST = SRC: the
# batch shell appends to the attempt log at the path the container reports.
# The environment reaches the container (keys such as OPENAI_API_KEY too; never a command line),
# except where the image sets the variable (PATH; HF_HOME and HHDPO_CACHE are passed explicitly, above).
# Dry run: HHDPO_DRY_RUN=1 (or --dry-run among a script's arguments) prints every command the job
# would run, shell-quoted, one per line after "+ ", and runs none, not even job-start (which
# checks the config and removes markers): `slurm/pipeline.sh --dry-run` checks the config.
# Progress lines go to stderr then, so stdout holds only the commands.

# hhdpo_dry: true in a dry run
hhdpo_dry() {
    [[ -n ${HHDPO_DRY_RUN:-} && ${HHDPO_DRY_RUN} != 0 ]]
}

# hhdpo_quote WORD...: the words shell-quoted like Python's shlex.quote, space-separated
hhdpo_quote() {
    local w safe='^[A-Za-z0-9_@%+=:,./-]+$' out=()
    for w; do
        if [[ $w =~ $safe ]]; then
            out+=("$w")
        else
            out+=("'${w//\'/\'\"\'\"\'}'")
        fi
    done
    printf '%s\n' "${out[*]}"
}

# hhdpo_show COMMAND...: how a dry run prints a command
hhdpo_show() {
    printf '+ %s\n' "$(hhdpo_quote "$@")"
}

# hhdpo_export NAME VALUE: export it; a dry run prints it (never for a secret)
hhdpo_export() {
    export "$1=$2"
    if hhdpo_dry; then
        hhdpo_show export "$1=$2"
    fi
}

# hhdpo_args ARGS...: HHDPO_ARGS = ARGS without --dry-run, which sets HHDPO_DRY_RUN=1
hhdpo_args() {
    local a
    HHDPO_ARGS=()
    for a; do
        if [[ $a == --dry-run ]]; then
            export HHDPO_DRY_RUN=1
        else
            HHDPO_ARGS+=("$a")
        fi
    done
}

# hhdpo_mode: HHDPO_MODE = bare, apptainer or pyxis from HHDPO_SIF / HHDPO_IMAGE; exits 2 on both
# or on a HHDPO_SIF that does not exist
hhdpo_mode() {
    if [[ -n ${HHDPO_SIF:-} && -n ${HHDPO_IMAGE:-} ]]; then
        echo "HHDPO_SIF ($HHDPO_SIF) and HHDPO_IMAGE ($HHDPO_IMAGE) are both set: unset one" \
            "(HHDPO_SIF runs the job in an Apptainer image, HHDPO_IMAGE through pyxis)" >&2
        exit 2
    fi
    if [[ -n ${HHDPO_SIF:-} ]]; then
        if [[ ! -e $HHDPO_SIF ]]; then
            echo "HHDPO_SIF=$HHDPO_SIF: no such image (relative to $PWD; it must be readable on the compute nodes)" >&2
            exit 2
        fi
        HHDPO_MODE=apptainer
    elif [[ -n ${HHDPO_IMAGE:-} ]]; then
        HHDPO_MODE=pyxis
    else
        HHDPO_MODE=bare
    fi
}

# hhdpo_binds REPO: HHDPO_BIND_LIST, the SRC:DST[:ro] binds of a container job (header), and
# HHDPO_CACHE_DIR, the cache among them; exits 2 on a bad HHDPO_BINDS entry
hhdpo_binds() {
    local repo=$1 wd=$PWD entry src dst opt
    HHDPO_BIND_LIST=()
    # a read-only checkout over the working directory would make runs/ in it read-only
    if [[ $repo != "$wd" && $repo/ != "$wd"/* ]]; then
        HHDPO_BIND_LIST+=("$repo:$repo:ro")
    fi
    HHDPO_BIND_LIST+=("$wd:$wd")  # after the checkout: a working directory inside it stays writable
    if [[ -n ${HF_HOME:-} ]]; then
        HHDPO_BIND_LIST+=("$HF_HOME:$HF_HOME")
    fi
    HHDPO_CACHE_DIR=${HHDPO_CACHE:-$wd/.cache/hhdpo}
    if [[ -n ${HHDPO_CACHE:-} ]]; then
        HHDPO_BIND_LIST+=("$HHDPO_CACHE:$HHDPO_CACHE")
    fi
    local -a extra=()
    IFS=, read -r -a extra <<<"${HHDPO_BINDS:-}"
    for entry in "${extra[@]}"; do
        [[ -n $entry ]] || continue
        IFS=: read -r src dst opt <<<"$entry"
        if [[ $src != /* || (-n $dst && $dst != /*) || (-n $opt && $opt != ro && $opt != rw) ]]; then
            echo "HHDPO_BINDS: bad entry '$entry': SRC[:DST[:ro]] with absolute paths, comma-separated" >&2
            exit 2
        fi
        HHDPO_BIND_LIST+=("$src:${dst:-$src}${opt:+:$opt}")
    done
}

# hhdpo_find_bin REPO: on the host, set HHDPO_BIN to the bin directory holding `hhdpo` and its python
# (HHDPO_PY). A job gets the environment sbatch was called from (PATH included), so an activated
# venv or conda env wins; else the checkout's .venv; HHDPO_BIN set by hand wins over both.
# pipeline.sh calls it (it runs sbatch, so on the host, also for container jobs), and checks the
# container mode here before it submits anything.
hhdpo_find_bin() {
    local exe
    hhdpo_mode
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

# hhdpo_find_cmds REPO: inside a job, how it runs hhdpo, by mode (header):
#   HHDPO_CMD, HHDPO_PYCMD  hhdpo / python from the batch shell
#   HHDPO_STEP_ARGS         srun options for a step the script starts itself (pyxis: the container)
#   HHDPO_STEP_CMD          hhdpo as run inside such a step
# Bare metal needs hhdpo on the host (hhdpo_find_bin); a container mode does not look for it.
# shellcheck disable=SC2034  # the sbatch scripts use them
hhdpo_find_cmds() {
    local binds
    hhdpo_mode
    HHDPO_STEP_ARGS=()
    if [[ $HHDPO_MODE == bare ]]; then
        hhdpo_find_bin "$1"
        HHDPO_CMD=("$HHDPO_BIN/hhdpo") HHDPO_PYCMD=("$HHDPO_PY") HHDPO_STEP_CMD=("$HHDPO_BIN/hhdpo")
        if hhdpo_dry; then
            echo "# bare metal: $HHDPO_BIN"
        fi
        return
    fi
    hhdpo_binds "$1"
    binds=$(IFS=,; echo "${HHDPO_BIND_LIST[*]}")
    if ! hhdpo_dry && ! mkdir -p "$HHDPO_CACHE_DIR"; then
        echo "the hhdpo cache $HHDPO_CACHE_DIR cannot be created: set HHDPO_CACHE to a writable directory" >&2
        exit 2
    fi
    if [[ $HHDPO_MODE == apptainer ]]; then
        if ! hhdpo_dry && ! command -v apptainer >/dev/null; then
            echo "HHDPO_SIF is set but apptainer is not on PATH on $(hostname) (module load apptainer?)" >&2
            exit 2
        fi
        local -a app=(apptainer exec --nv --bind "$binds" --pwd "$PWD")
        [[ -n ${HF_HOME:-} ]] && app+=(--env "HF_HOME=$HF_HOME")
        app+=(--env "HHDPO_CACHE=$HHDPO_CACHE_DIR" "$HHDPO_SIF")
        HHDPO_CMD=("${app[@]}" hhdpo) HHDPO_PYCMD=("${app[@]}" python) HHDPO_STEP_CMD=("${app[@]}" hhdpo)
    else
        if ! hhdpo_dry && ! srun --help 2>/dev/null | grep -q -- --container-image; then
            echo "HHDPO_IMAGE is set but this srun has no --container-image: pyxis is not installed here" >&2
            exit 2
        fi
        HHDPO_STEP_ARGS=(--container-image="$HHDPO_IMAGE" --container-mounts="$binds" --container-workdir="$PWD"
            --container-env="${HF_HOME:+HF_HOME,}HHDPO_CACHE")
        # one task with the node's CPUs (a step gets the job's GPUs by default)
        local -a step=(srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
            "${HHDPO_STEP_ARGS[@]}")
        HHDPO_CMD=("${step[@]}" hhdpo) HHDPO_PYCMD=("${step[@]}" python) HHDPO_STEP_CMD=(hhdpo)
    fi
    if hhdpo_dry; then
        echo "# $HHDPO_MODE: ${HHDPO_SIF:-$HHDPO_IMAGE}; binds: $binds"
    fi
    if [[ $HHDPO_MODE == pyxis ]]; then
        hhdpo_export HHDPO_CACHE "$HHDPO_CACHE_DIR"  # --container-env=HHDPO_CACHE passes the host's value
    fi
}

# hhdpo_job_init REPO STAGE ARGS...: inside a job. Finds hhdpo, sets the run's paths (run_dir,
# attempt_log) through `python -m hhdpo.launch.slurm job-start`, which exits 2 on a bad config or stale
# upstream outputs before anything runs, and removes this stage's and later stages' markers.
hhdpo_job_init() {
    local repo=$1 out rc
    shift
    hhdpo_find_cmds "$repo"
    # a hung rank prints every thread's stack on SIGABRT/SIGSEGV; logs appear line by line
    export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
    run_dir="" attempt_log="" cleared=""
    if hhdpo_dry; then
        hhdpo_show "${HHDPO_PYCMD[@]}" -m hhdpo.launch.slurm job-start "$@"
        out=""
    else
        out=$("${HHDPO_PYCMD[@]}" -m hhdpo.launch.slurm job-start "$@")
    fi
    rc=$?
    if ((rc != 0)); then
        echo "[slurm] $1: not started (exit $rc)" >&2
        exit "$rc"
    fi
    # job-start prints shell-quoted assignments of these
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
    hhdpo_export OMP_NUM_THREADS "${OMP_NUM_THREADS:-$1}"
}

# the job's nodes one by one (n1,n2), not SLURM's compressed list (n[1-2])
hhdpo_hosts() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | paste -sd, -
}

# hhdpo_node_addr NODE: the address SLURM reaches NODE at, its NodeAddr (`scontrol show node`; the
# NodeName itself unless slurm.conf sets another), NODE when scontrol cannot say. A NodeName need
# not resolve on the nodes (the test cluster's n1/n2 only do through its /etc/hosts line); the
# NodeAddr is what slurmctld connects to. hhdpo/core/distenv.py does the same (node_addr).
hhdpo_node_addr() {
    local addr
    addr=$(scontrol -o show node "$1" 2>/dev/null | grep -o ' NodeAddr=[^ ]*' | cut -d= -f2-)
    printf '%s\n' "${addr:-$1}"
}

# hhdpo_log MESSAGE: to the job's output and this attempt's log (a dry run: stderr)
hhdpo_log() {
    if hhdpo_dry; then
        printf '[slurm %(%F %T)T] %s\n' -1 "$*" >&2
        return
    fi
    printf '[slurm %(%F %T)T] %s\n' -1 "$*" | tee -a "${attempt_log:-/dev/null}"
}

# hhdpo_run COMMAND...: run it with its output (stdout and stderr) also in this attempt's log;
# returns its exit status. A dry run prints it instead and returns 0.
# The tee ignores the stop signals: SLURM sends SIGTERM (preemption, time limit, scancel) and
# `scancel --full --signal=USR2` USR2 to every process of the batch step, tee included; a tee that
# died of them would take the lines the ranks print while they save (and srun's own) out of both
# logs, the -o file too (it is tee's stdout). It ends when the command's output does.
hhdpo_run() {
    if hhdpo_dry; then
        hhdpo_show "$@"
        return 0
    fi
    "$@" 2>&1 | (trap '' TERM USR1 USR2 HUP INT && exec tee -a "$attempt_log")
    return "${PIPESTATUS[0]}"
}

# hhdpo_job_done STAGE ARGS...: the stage's completion marker, with its config hash
hhdpo_job_done() {
    hhdpo_run "${HHDPO_PYCMD[@]}" -m hhdpo.launch.slurm job-done "$@"
}
