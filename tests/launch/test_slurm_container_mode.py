"""slurm/*.sbatch in their three modes: bare metal, Apptainer (HHDPO_SIF), pyxis (HHDPO_IMAGE).

No cluster: the scripts run under bash directly with the SLURM_* variables they read. Golden
files pin the dry-run commands (HHDPO_UPDATE_GOLDEN=1 rewrites them), with the checkout, the
interpreter's bin directory and the test's temporary directory normalised. A fake ``apptainer``
and a fake pyxis ``srun`` (they run the command on the host) check the real path: job-start's
variables, the attempt log, the completion marker, and no secret on a command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parents[1] / "golden" / "container_mode"
BIN = str(Path(sys.executable).parent)
SECRET = "sk-test-never-printed-0123456789"
ARGS = ("--config", str(REPO / "configs" / "smollm2_cpu.yaml"), "run_dir=runs/golden", "judge.model=a judge")
IMAGE = "nvcr.io#acme/hhdpo:gpu"

# the allocation each case renders: stage, SLURM_* variables, more environment
CASES = {
    "train_gpu": ("train", {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_ON_NODE": "96",
                            "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[1-2]"},
                  {"HF_HOME": "/shared/hf", "HHDPO_BINDS": "/datasets/hh:/data:ro,/scratch"}),
    "train_cpu": ("train", {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "2",
                            "SLURM_JOB_NODELIST": "n[1-2]"}, {}),
    "generate_gpu": ("generate", {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "32",
                                  "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu3"}, {"HF_HOME": "/shared/hf"}),
    "judge_cpu": ("judge", {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "4",
                            "SLURM_JOB_NODELIST": "n1"}, {}),
}
MODES = ("bare", "apptainer", "pyxis")

FAKE_SCONTROL = """#!/bin/bash
# hostnames of the cases' node lists, and the nodes' NodeAddr (an address, not the name: the ranks
# must meet there); anything else (show job) fails, as without a controller
if [[ $1 == -o && $2 == show && $3 == node ]]; then
    case $4 in gpu1) addr=10.0.0.11 ;; n1) addr=10.0.1.1 ;; *) exit 1 ;; esac
    echo "NodeName=$4 Arch=x86_64 CoresPerSocket=1 NodeAddr=$addr NodeHostName=$4 Version=22.05.8"
    exit 0
fi
[[ $1 == show && $2 == hostnames ]] || exit 1
case $3 in 'gpu[1-2]') printf 'gpu1\\ngpu2\\n' ;; 'n[1-2]') printf 'n1\\nn2\\n' ;; *) echo "$3" ;; esac
"""

# the container runtimes, faked: log the command line, check the image, run the command on the host
# with the venv's hhdpo and python (a fake hhdpo only echoes its stage)
FAKE_RUNTIME = """#!/bin/bash
printf '%s\\n' "$(basename "$0") $*" >>"$FAKE_LOG"
if [[ $(basename "$0") == srun ]]; then
    [[ $1 == --help ]] && { echo '  --container-image=IMAGE   [pyxis] the image'; exit 0; }
    while [[ $1 == --* ]]; do [[ $1 == --container-image=* ]] && image=${1#*=}; shift; done
    [[ ${image:-} == "$HHDPO_IMAGE" ]] || { echo "fake srun: no --container-image" >&2; exit 99; }
else
    [[ $1 == exec ]] && shift
    while [[ $1 == --* ]]; do [[ $1 == --nv ]] && shift || shift 2; done
    [[ $1 == "$HHDPO_SIF" ]] || { echo "fake apptainer: image $1" >&2; exit 99; }
    shift
fi
[[ -n ${OPENAI_API_KEY:-} ]] || { echo "the environment did not reach the container" >&2; exit 98; }
case $1 in
    python) shift; exec "$HOST_BIN/python" "$@" ;;
    hhdpo) echo "fake hhdpo $2 in $PWD" ;;
    *) echo "fake runtime: unexpected command $1" >&2; exit 97 ;;
esac
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def box(tmp_path):
    """A working directory, an image file and a bin directory with the fake scontrol first on PATH."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "hhdpo.sif").write_text("not an image")
    stub = tmp_path / "stub"
    stub.mkdir()
    _write_exe(stub / "scontrol", FAKE_SCONTROL)
    return tmp_path


def _env(box: Path, mode: str, **kw) -> dict:
    env = {"PATH": f"{box / 'stub'}:/usr/bin:/bin", "HOME": str(box), "LANG": "C.UTF-8", "HHDPO_REPO": str(REPO),
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(box / "jobs"), "SLURM_RESTART_COUNT": "0",
           "OPENAI_API_KEY": SECRET}
    if mode == "bare":
        env["HHDPO_BIN"] = BIN
    else:  # a container job needs no hhdpo on the host: a bare-metal job would fail on this one
        env["HHDPO_BIN"] = "/nonexistent/bin"
        env.update({"apptainer": {"HHDPO_SIF": str(box / "hhdpo.sif")}, "pyxis": {"HHDPO_IMAGE": IMAGE}}[mode])
    env.update(kw)
    return env


def _run(script: str, env: dict, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm" / f"{script}.sbatch"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=60, check=False)


def _normalize(text: str, box: Path) -> str:
    return text.replace(BIN, "{BIN}").replace(str(REPO), "{REPO}").replace(str(box), "{TMP}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_dry_run_prints_the_exact_commands(box, case, mode):
    stage, slurm, extra = CASES[case]
    env = _env(box, mode, **slurm, **extra)
    args = list(ARGS) + (["--models", "policy,base"] if stage == "generate" else [])
    if stage == "generate":  # the argument, anywhere among the others
        args.insert(2, "--dry-run")
    else:
        env["HHDPO_DRY_RUN"] = "1"
    p = _run(stage, env, *args, cwd=box / "jobs")
    assert p.returncode == 0, p.stderr
    assert SECRET not in p.stdout + p.stderr and "--dry-run" not in p.stdout
    got = _normalize(p.stdout, box)
    golden = GOLDEN / f"{case}_{mode}.txt"
    if os.environ.get("HHDPO_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    assert got == golden.read_text()
    assert not (box / "jobs" / "runs").exists()  # a dry run runs nothing: no job-start, no log directory


def test_working_directory_in_the_checkout_stays_writable(box):
    """Run from the checkout: one read-write bind; from a directory in it: the checkout read-only first."""
    for cwd, binds in ((REPO, f"{REPO}:{REPO}"), (REPO / "configs", f"{REPO}:{REPO}:ro,{REPO}/configs:{REPO}/configs")):
        p = _run("judge", _env(box, "apptainer", HHDPO_DRY_RUN="1", SLURM_SUBMIT_DIR=str(cwd)), *ARGS, cwd=cwd)
        assert p.returncode == 0, p.stderr
        assert f"# apptainer: {box / 'hhdpo.sif'}; binds: {binds}\n" in p.stdout
        assert f" --bind {binds} --pwd {cwd} " in p.stdout


def test_dry_run_outside_slurm_needs_no_slurm_variables(box):
    """`bash slurm/train.sbatch --dry-run ...`: the checkout from the script's own path."""
    env = {k: v for k, v in _env(box, "pyxis").items() if not k.startswith("SLURM_") and k != "HHDPO_REPO"}
    p = _run("train", env, "--dry-run", *ARGS, cwd=box / "jobs")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"# pyxis: {IMAGE}; binds: {REPO}:{REPO}:ro,{box / 'jobs'}:{box / 'jobs'}"
    assert any(line.startswith("+ srun --nodes=1 --ntasks-per-node=1 --ntasks=1 --cpus-per-task=1 --kill-on-bad-exit=1 "
                               "'--container-image=") for line in lines), p.stdout


@pytest.mark.parametrize("script", ["train", "generate", "judge", "pipeline"])
def test_both_modes_at_once_is_an_error(box, script):
    env = _env(box, "apptainer", HHDPO_IMAGE=IMAGE, HHDPO_DRY_RUN="1", HHDPO_BIN=BIN)
    cmd = [str(REPO / "slurm" / "pipeline.sh"), *ARGS[1:], "--dry-run"] if script == "pipeline" else None
    p = (subprocess.run(cmd, capture_output=True, text=True, cwd=box / "jobs", env=env, timeout=60, check=False)
         if cmd else _run(script, env, *ARGS, cwd=box / "jobs"))
    assert p.returncode == 2 and not p.stdout, p.stdout + p.stderr
    assert "HHDPO_SIF" in p.stderr and "HHDPO_IMAGE" in p.stderr and "both set" in p.stderr


@pytest.mark.parametrize("dry", [True, False])
def test_a_missing_sif_stops_the_job_before_anything_runs(box, dry):
    _write_exe(box / "stub" / "apptainer", "#!/bin/bash\ntouch \"$HOME/ran\"\n")
    env = _env(box, "apptainer", HHDPO_SIF=str(box / "missing.sif"), **({"HHDPO_DRY_RUN": "1"} if dry else {}))
    p = _run("generate", env, *ARGS, cwd=box / "jobs")
    assert p.returncode == 2 and not p.stdout, p.stdout + p.stderr
    assert f"HHDPO_SIF={box / 'missing.sif'}: no such image" in p.stderr
    assert not (box / "ran").exists()


def test_bad_binds_and_missing_runtimes_are_errors(box):
    p = _run("judge", _env(box, "pyxis", HHDPO_BINDS="/ok,relative/dir", HHDPO_DRY_RUN="1"), *ARGS, cwd=box / "jobs")
    assert p.returncode == 2 and "HHDPO_BINDS: bad entry 'relative/dir'" in p.stderr and not p.stdout
    if not any((Path(d) / "apptainer").exists() for d in ("/usr/bin", "/bin")):
        p = _run("judge", _env(box, "apptainer"), *ARGS, cwd=box / "jobs")
        assert p.returncode == 2 and "apptainer is not on PATH" in p.stderr
    _write_exe(box / "stub" / "srun", "#!/bin/bash\necho '  --ntasks=N'\n")  # an srun without pyxis
    p = _run("judge", _env(box, "pyxis"), *ARGS, cwd=box / "jobs")
    assert p.returncode == 2 and "pyxis is not installed" in p.stderr


@pytest.mark.parametrize("mode", ["apptainer", "pyxis"])
def test_a_container_job_runs_every_python_call_inside(box, mode):
    """The judge job for real with a fake runtime: job-start's paths reach the batch shell, the
    stages and job-done run through the container, the key through the environment only. The fake
    judge judges nothing, so job-done finds the stage incomplete: exit 75 and no marker."""
    runtime = "apptainer" if mode == "apptainer" else "srun"
    _write_exe(box / "stub" / runtime, FAKE_RUNTIME)
    log = box / "runtime.log"
    env = _env(box, mode, SLURM_CPUS_ON_NODE="2", FAKE_LOG=str(log), HOST_BIN=BIN, HF_HOME=str(box / "hf"),
               HHDPO_CACHE=str(box / "cache"))
    p = _run("judge", env, *ARGS, cwd=box / "jobs")
    assert p.returncode == 75, p.stdout + p.stderr
    run = box / "jobs" / "runs" / "golden"
    for stage in ("pairwise", "judge", "summarize", "report"):
        assert f"fake hhdpo {stage} in {box / 'jobs'}" in p.stdout
    assert f"(run_dir {run})" in p.stdout
    (attempt,) = (run / "slurm" / "logs").glob("judge-4242-attempt0.log")
    assert "fake hhdpo summarize" in attempt.read_text()
    assert "judge incomplete, no completion marker (exit 75)" in p.stdout + p.stderr
    assert not (run / "slurm" / "done").exists()
    calls = log.read_text().splitlines()
    assert len(calls) == (6 if mode == "apptainer" else 7)  # pyxis: `srun --help` first
    assert all(SECRET not in c for c in calls)
    assert [c.split(" python -m hhdpo.launch.slurm ")[1].split()[0] for c in calls if " -m hhdpo.launch.slurm " in c] == \
        ["job-start", "job-done"]
    binds = f"{REPO}:{REPO}:ro,{box / 'jobs'}:{box / 'jobs'},{box / 'hf'}:{box / 'hf'},{box / 'cache'}:{box / 'cache'}"
    want = (f"--bind {binds} --pwd {box / 'jobs'} --env HF_HOME={box / 'hf'} --env HHDPO_CACHE={box / 'cache'} "
            if mode == "apptainer" else f"--container-mounts={binds} ")
    assert all(want in c for c in calls if "--help" not in c), calls
    if mode == "pyxis":  # the host's values, exported by the batch shell
        assert all("--container-env=HF_HOME,HHDPO_CACHE " in c for c in calls if "--help" not in c), calls
    # the image is read-only (Apptainer): the cache is a host directory, created for the job
    assert (box / "cache").is_dir()


# ---- train.sbatch: the step this allocation holds

TRAIN_STEP = ("bash -c 'echo \"[slurm] rank $SLURM_PROCID of $SLURM_STEP_NUM_TASKS on $SLURMD_NODENAME\"; trap : TERM USR2; "
              "\"$@\"; rc=$?; if ((rc == 42)) && mkdir -p \"$HHDPO_STEP_EXITS\" && : >\"$HHDPO_STEP_EXITS/rank$SLURM_PROCID\"; "
              "then exit 0; fi; exit \"$rc\"' hhdpo-rank")


@pytest.mark.parametrize("alloc, step", [
    # sbatch -N 2 --gpus-per-node=8 --exclusive: the header's one task per node, the node's 96 CPUs
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "96", "SLURM_GPUS_ON_NODE": "8"},
     "--ntasks-per-node=8 --ntasks=16 --cpus-per-task=12 --kill-on-bad-exit=1 --gpu-bind=none"),
    # sbatch -N 2 --gpus-per-node=a100:4 --cpus-per-task=16: one task's 16 CPUs shared by 4 ranks
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "16", "SLURM_CPUS_ON_NODE": "16", "SLURM_GPUS_PER_NODE": "a100:4"},
     "--ntasks-per-node=4 --ntasks=8 --cpus-per-task=4 --kill-on-bad-exit=1 --gpu-bind=none"),
    # sbatch -N 2 --ntasks-per-node=8 --gpus-per-task=1 --cpus-per-task=12: still every GPU for every task
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "12", "SLURM_CPUS_ON_NODE": "96", "SLURM_GPUS_ON_NODE": "8",
      "SLURM_GPUS_PER_TASK": "1"},
     "--ntasks-per-node=8 --ntasks=16 --cpus-per-task=12 --kill-on-bad-exit=1 --gpu-bind=none"),
    # CPU nodes: sbatch -N 2 --ntasks-per-node=2 --cpus-per-task=3
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "6"},
     "--ntasks-per-node=2 --ntasks=4 --cpus-per-task=3 --kill-on-bad-exit=1"),
])
def test_train_step_ranks_and_cpus_follow_the_allocation(box, alloc, step):
    """One rank per GPU whatever --ntasks-per-node says, CPUs per rank from what the node holds,
    every task seeing the node's GPUs (no --gpus-per-task), and a rank that fails ending the step;
    the ranks meet on the first node's NodeAddr, not its name."""
    env = _env(box, "bare", HHDPO_DRY_RUN="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[1-2]", **alloc)
    p = _run("train", env, *ARGS, cwd=box / "jobs")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    srun = [ln for ln in lines if ln.startswith("+ srun ")]
    assert srun == [f"+ srun --nodes=2 {step} {TRAIN_STEP} {BIN}/hhdpo train {' '.join(ARGS[:3])} 'judge.model=a judge'"], \
        p.stdout
    assert "--gpus-per-task" not in p.stdout
    assert "+ export MASTER_ADDR=10.0.0.11" in lines  # gpu1's NodeAddr
    assert "the ranks meet on 10.0.0.11 (the NodeAddr of gpu1)" in p.stderr


@pytest.mark.parametrize("dry", [True, False])
def test_train_stops_before_anything_runs_when_the_allocation_cannot_hold_the_ranks(box, dry):
    """`sbatch --gpus-per-node=8 slurm/train.sbatch` with the header's --ntasks-per-node=1: one CPU
    on the node for 8 ranks. No step SLURM would refuse, no job-start (markers stay): exit 2 and
    the options to add."""
    env = _env(box, "bare", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu1", SLURM_NTASKS_PER_NODE="1",
               SLURM_CPUS_ON_NODE="1", SLURM_GPUS_ON_NODE="8", **({"HHDPO_DRY_RUN": "1"} if dry else {}))
    _write_exe(box / "stub" / "srun", "#!/bin/bash\ntouch \"$HOME/ran\"\n")
    p = _run("train", env, *ARGS, cwd=box / "jobs")
    assert p.returncode == 2 and not p.stdout, p.stdout + p.stderr
    assert "8 GPU(s) per node make 8 rank(s) per node, but the job has 1 CPU(s) per node" in p.stderr
    assert "add --ntasks-per-node=8 --cpus-per-task=N" in p.stderr and "--exclusive" in p.stderr
    assert not (box / "ran").exists() and not (box / "jobs" / "runs").exists()


# ---- the CUDA image: multi-node NCCL over InfiniBand/RoCE

RDMA = ("rdma-core", "ibverbs-providers", "libibverbs1")

FAKE_APT = """#!/bin/bash
printf '%s\\n' "$*" >>"$APT_LOG"
"""


def _dockerfile_runs(text: str) -> list[str]:
    """The RUN instructions' shell text, continuation lines joined and comment lines dropped as
    Docker's parser does (spython keeps only a RUN's first line)."""
    runs, cur = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if cur is None:
            if not line.startswith("RUN "):
                continue
            cur, line = "", line[4:]
        cont = line.rstrip().endswith("\\")
        cur += line.rstrip()[:-1] if cont else line + "\n"  # backslash-newline is removed
        if not cont:
            runs.append(cur)
            cur = None
    return runs


def _apt_installs(variant: str, tmp: Path) -> set[str]:
    """The packages the Dockerfile's apt RUN installs for ``variant``: that RUN run by bash with the
    image's SHELL options (-o pipefail -c) and the build argument, a fake apt-get and rm on PATH."""
    runs = [r for r in _dockerfile_runs((REPO / "Dockerfile").read_text()) if "apt-get install" in r]
    assert len(runs) == 1, runs
    stub = tmp / f"apt-{variant}"
    stub.mkdir()
    for name in ("apt-get", "rm"):
        _write_exe(stub / name, FAKE_APT)
    log = tmp / f"apt-{variant}.log"
    p = subprocess.run(["/bin/bash", "-o", "pipefail", "-c", runs[0]], capture_output=True, text=True, timeout=60,
                       check=False, env={"PATH": f"{stub}:/usr/bin:/bin", "APT_LOG": str(log), "VARIANT": variant})
    assert p.returncode == 0, p.stdout + p.stderr
    installs = [ln.split() for ln in log.read_text().splitlines() if " install " in f" {ln} "]
    assert len(installs) == 1, log.read_text()
    return {w for w in installs[0] if not w.startswith("-") and w != "install"}


def test_cuda_image_installs_the_rdma_user_space(tmp_path):
    """NCCL's IB transport (InfiniBand, RoCE) dlopens libibverbs and needs the verbs providers
    (mlx5, ...): without them multi-node NCCL silently falls back to TCP sockets. The GPU variant
    installs them; the CPU one does not need them."""
    gpu, cpu = _apt_installs("gpu", tmp_path), _apt_installs("cpu", tmp_path)
    assert set(RDMA) <= gpu, gpu
    assert not set(RDMA) & cpu, cpu
    assert {"python3", "python3-venv", "ca-certificates", "libnuma1"} <= gpu & cpu
