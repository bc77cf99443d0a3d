"""slurm/*.sbatch and slurm/pipeline.sh on the real local cluster (tests/slurm_cluster.py), plus
the pieces of hhdpo/launch/slurm.py they rely on (markers, timeout vs preemption, the dry-run commands).

The cluster's two nodes share this machine's cores: training runs use a tiny random Llama (or
SmolLM2 for the pipeline) on a few HH pairs, and every cluster job of the module is submitted at
once (fixture ``jobs``) so that SLURM runs them side by side; each test then waits for its own.
Run directories live under a world-traversable directory in /tmp.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hhdpo.core.config import ConfigError, load_config
from hhdpo.core.io import read_jsonl
from hhdpo.launch import slurm as hs
from tests.slurm_cluster import REPO

CFG = REPO / "configs" / "smollm2_cpu.yaml"
PIPELINE = REPO / "slurm" / "pipeline.sh"
TRAIN = REPO / "slurm" / "train.sbatch"
GOLDEN = Path(__file__).parents[1] / "golden"
# the interpreter running the tests runs the jobs too (the scripts' HHDPO_BIN)
BIN = str(Path(sys.executable).parent)
STAGE_ENV = ("HHDPO_TRAIN_SBATCH", "HHDPO_GENERATE_SBATCH", "HHDPO_JUDGE_SBATCH", "HHDPO_REPO",
             "HHDPO_SIGNAL_LEAD", "HHDPO_MAX_TIMEOUT_REQUEUES")


def _read(p: Path) -> str:
    try:
        return Path(p).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _env(base: dict | None = None, **kw) -> dict:
    env = {k: v for k, v in (base or os.environ).items() if k not in STAGE_ENV}
    env.update(HHDPO_BIN=BIN, PYTHONUNBUFFERED="1", **kw)
    return env


@pytest.fixture(scope="module")
def shared():
    """A world-traversable directory in /tmp for the jobs' files (both nodes read it)."""
    d = Path(tempfile.mkdtemp(prefix="hhdpo-sbatch-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(shared, tiny_llama_dir) -> Path:
    """The tests' tiny random Llama, copied where both nodes read it."""
    return Path(shutil.copytree(tiny_llama_dir, shared / "tiny"))


STEPS = 12  # the preempted run gets USR2 once step 2 is logged: enough steps left on a fast machine


def tiny_train(hh_file, run_dir, model, **kw) -> list[str]:
    """A few DPO steps on 64 HH pairs, every step logged."""
    o = {"run_dir": run_dir, "dataset.dataset_name": hh_file, "dataset.subset": "train[:64]", "dataset.val_ratio": 0,
         "dataset.max_len": 64, "dataset.max_prompt_len": 40, "dpo_training.batch_size": 1,
         "dpo_training.learning_rate": 1e-5, "dpo_training.warmup_steps": 2, "dpo_training.log_steps": 1,
         "dpo_training.max_steps": STEPS, "checkpoint.save_steps": 0, "policy_model": model, "ref_model": model}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "model" / "metrics.jsonl") if "loss" in r]


def _steps_logged(run: Path) -> int:
    try:
        return len(_losses(run))
    except (FileNotFoundError, ValueError):
        return 0


def _attempt_logs(run: Path, stage: str, job: str) -> list[Path]:
    return sorted((run / "slurm" / "logs").glob(f"{stage}-{job}-attempt*.log"))


# ----------------------------------------------------------------------------- no cluster needed


def test_every_script_in_slurm_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: slurm/cluster/start.sh --install installs it"
    scripts = sorted(p for p in (REPO / "slurm").rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert {"train.sbatch", "generate.sbatch", "judge.sbatch", "pipeline.sh", "common.sh"} <= {p.name for p in scripts}
    p = subprocess.run([shellcheck, "-x", *map(str, scripts)], capture_output=True, text=True, cwd=REPO, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def _dry_run(cwd: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PIPELINE), *map(str, args), "--dry-run"], capture_output=True, text=True, cwd=cwd,
                          env=env or _env(), timeout=60, check=False)


GOLDEN_ARGS = ("run_dir=runs/golden", "dataset.dataset_name=data/hh.jsonl.gz", "HH_test.hh_test=data/hh.jsonl.gz",
               "dpo_training.max_steps=2", "judge.model=a judge")


def _normalize(text: str, cwd: Path) -> str:
    text = text.replace(str(REPO), "{REPO}").replace(str(cwd.resolve()), "{CWD}").replace(str(cwd), "{CWD}")
    return re.sub(r"config hash [0-9a-f]{16}", "config hash {HASH}", text)


@pytest.mark.parametrize("case", ["fresh", "stage_options", "train_done"])
def test_pipeline_dry_run_prints_the_exact_sbatch_commands(tmp_path, monkeypatch, case):
    """Golden files pin the commands (HHDPO_UPDATE_GOLDEN=1 rewrites them); run from another
    directory, the paths are absolute (config, scripts) or the caller's (run_dir)."""
    env = _env()
    if case == "stage_options":
        env.update(HHDPO_TRAIN_SBATCH="-N 4 --ntasks-per-node=8 --gpus-per-node=8 -t 24:00:00",
                   HHDPO_GENERATE_SBATCH="--gpus-per-node=1", HHDPO_JUDGE_SBATCH="--partition=cpu --time=2:00:00")
    if case == "train_done":
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("SLURM_JOB_ID", "123")
        hs.write_marker(load_config(CFG, list(GOLDEN_ARGS)), "train")
    p = _dry_run(tmp_path, CFG, *GOLDEN_ARGS, env=env)
    assert p.returncode == 0, p.stderr
    got = _normalize(p.stdout, tmp_path)
    golden = GOLDEN / f"pipeline_dry_run_{case}.txt"
    if os.environ.get("HHDPO_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()
    assert not (tmp_path / "runs" / "golden" / "slurm" / "logs").exists()  # a dry run creates nothing


def test_pipeline_refuses_bad_config_and_another_runs_training(tmp_path):
    p = _dry_run(tmp_path, CFG, "run_dir=r", "dpo_training.dpo_bta=0.2")
    assert p.returncode == 2 and "dpo_training.dpo_bta: unknown config key" in p.stderr and not p.stdout
    # a save_dir trained with another config: resuming there would continue the other run
    (tmp_path / "r" / "model").mkdir(parents=True)
    (tmp_path / "r" / "model" / "config.yaml").write_text((REPO / "configs" / "smollm2_cpu.yaml").read_text())
    p = _dry_run(tmp_path, CFG, "run_dir=r", "dpo_training.dpo_beta=0.2")
    assert p.returncode == 2 and "holds a training run with another config (dpo_training.dpo_beta: 0.1 -> 0.2)" in p.stderr
    p = _dry_run(tmp_path, CFG, "run_dir=r")
    assert p.returncode == 0 and p.stdout.count("$(sbatch ") == 3, p.stderr


def test_pending_array_elements_count_as_in_flight(slurm_cluster, tmp_path):
    """A sweep's trainings are one job array: squeue shows its pending elements as one "J_[0-1%1]"
    line unless asked for one per element; a second submission into the run must still see them."""
    cfg = load_config(CFG, [f"run_dir={tmp_path}"])
    job = slurm_cluster.sbatch("--hold", "--array=0-1%1", "-o", "/dev/null", "--wrap", "true")
    try:
        hs.record_jobs(cfg, {"train:a": f"{job}_0", "train:b": f"{job}_1", "judge": "999999"})
        assert hs.jobs_in_flight(cfg) == [f"{job}_0", f"{job}_1"]
        with pytest.raises(ConfigError, match=f"job\\(s\\) {job}_0, {job}_1 of an earlier submission"):
            hs.check_run_dir(cfg, ["generate"])
    finally:
        slurm_cluster.run("scancel", job)


def test_markers_count_only_with_their_config_hash(tmp_path):
    base = [f"run_dir={tmp_path}"]
    cfg = load_config(CFG, base)
    for s in hs.STAGES:
        hs.write_marker(cfg, s)
    assert hs.plan(cfg) == (["train", "generate", "judge"], [])
    # a judging key invalidates the judge stage only; a generation key generate and judge
    assert hs.plan(load_config(CFG, base + ["judge.max_output_tokens=7"]))[1] == ["judge"]
    assert hs.plan(load_config(CFG, base + ["judge.concurrency=2"]))[1] == []  # how, not what
    assert hs.plan(load_config(CFG, base + ["HH_test.num_sample=3"]))[1] == ["generate", "judge"]
    # a training key invalidates all three, also where the later markers say otherwise
    assert hs.plan(load_config(CFG, base + ["dpo_training.dpo_beta=0.3"]))[1] == ["train", "generate", "judge"]
    assert hs.plan(load_config(CFG, base + ["vllm.tensor_parallel_size=4"]))[1] == []
    # a stage that starts removes its own marker and the later ones
    assert hs.clear_markers_from(cfg, "generate") == ["generate", "judge"]
    assert hs.plan(cfg) == (["train"], ["generate", "judge"])


def test_time_left_and_stop_reason():
    assert [hs.parse_time_left(t) for t in ("1-02:03:04", "10:00:00", "03:04", "7", "UNLIMITED", "INVALID")] == \
        [93784, 36000, 184, 7, None, None]
    lead = 300
    assert hs.stop_reason(250, lead) == "timeout"  # the signal came with the lead; the save took 50 s
    assert hs.stop_reason(lead + hs.SIGNAL_SLACK, lead) == "timeout"  # sent up to a minute early
    assert hs.stop_reason(lead + hs.SIGNAL_SLACK + 1, lead) == "preemption"
    assert hs.stop_reason(None, lead) == "preemption"  # no time limit


def test_timeout_requeues_are_capped_per_job(tmp_path, monkeypatch):
    monkeypatch.setenv("HHDPO_SIGNAL_LEAD", "100")
    monkeypatch.setenv("HHDPO_MAX_TIMEOUT_REQUEUES", "2")
    decisions = [hs.requeue_decision(tmp_path, "17", 90) for _ in range(3)]
    assert [d[0] for d in decisions] == [True, True, False]
    assert "timeout; requeueing (timeout requeue 1 of at most 2)" in decisions[0][1]
    assert "not requeued, 2 timeout requeue(s) already" in decisions[2][1]
    assert hs.requeue_decision(tmp_path, "17", 5000)[0]  # preemptions are never capped
    assert hs.requeue_decision(tmp_path, "18", 90)[0]  # another job counts from zero
    assert not hs.requeue_decision(tmp_path, "17", "unknown")[0]  # squeue failed: counted as a timeout


def test_requeue_decision_takes_the_hosts_time_left_in_container_jobs(tmp_path):
    """In a container there is no squeue: train.sbatch passes the host's %L as HHDPO_TIME_LEFT."""
    def decide(left):
        env = _env(SLURM_JOB_ID="77", HHDPO_TIME_LEFT=left, HHDPO_SIGNAL_LEAD="300")
        return subprocess.run([sys.executable, "-m", "hhdpo.launch.slurm", "requeue-decision", str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    p = decide("10:00")  # 600 s left: more than the 300 s lead + 60 s slack
    assert p.returncode == 0 and "600 s left of the time limit" in p.stdout and "preemption; requeueing" in p.stdout
    p = decide("04:00")
    assert p.returncode == 0 and "timeout; requeueing (timeout requeue 1 of at most 3)" in p.stdout
    p = decide("")  # the host's squeue failed: counted as a timeout
    assert p.returncode == 0 and "time left unknown" in p.stdout and "timeout requeue 2 of at most 3" in p.stdout


# ----------------------------------------------------------------------------- on the cluster


def _sbatch_train(cluster, cwd: Path, out: Path, overrides: list[str], *opts, env=None) -> str:
    p = cluster.run("sbatch", "--parsable", *opts, "-o", out, TRAIN, "--config", CFG, *overrides, cwd=cwd,
                    env=env or _env(cluster.env))
    return p.stdout.strip().split(";")[0]


# A stand-in for `hhdpo train` in the step (the batch script's own python calls, job-start and
# job-done, are real): each rank says where it meets the others, then acts out FAKE_RANKS. Seconds
# per job instead of minutes, for what the step itself must do.
FAKE_HHDPO = r"""#!/bin/bash
echo "fake rank $SLURM_PROCID of $SLURM_STEP_NUM_TASKS on $SLURMD_NODENAME: MASTER_ADDR=${MASTER_ADDR:-unset} cpus=${SLURM_CPUS_PER_TASK:-?} $1"
case ${FAKE_RANKS:-} in
    fail)  # rank 1 fails (once both run); rank 0 stands for a rank waiting in a collective
        if [[ $SLURM_PROCID == 1 ]]; then sleep 2; echo "fake rank 1: failing"; exit 3; fi
        sleep 300 && echo "fake rank 0: outlived the failed rank" ;;
    stop42)  # attempt 0: the ranks stop together (exit 42), rank 1 a few seconds after rank 0
        if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
            if [[ $SLURM_PROCID == 1 ]]; then sleep 3; echo "fake rank 1: checkpoint written"; fi
            exit 42
        fi ;;
    signals)  # a stop signal: save for a few seconds, printing, then exit 0
        for sig in TERM USR2; do
            trap "trap '' TERM USR2; echo \"fake rank \$SLURM_PROCID: got $sig, saving\"; sleep 3;
                  echo \"fake rank \$SLURM_PROCID: line printed after $sig\"; exit 0" "$sig"
        done
        echo "fake rank $SLURM_PROCID: ready"
        while :; do sleep 0.2; done ;;
esac
"""


@pytest.fixture(scope="module")
def fake_bin(shared) -> Path:
    """HHDPO_BIN with the fake hhdpo and the real python (a wrapper: a venv's python found by a
    symlink elsewhere would not know its venv)."""
    d = shared / "fakebin"
    d.mkdir()
    (d / "hhdpo").write_text(FAKE_HHDPO)
    (d / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    for f in d.iterdir():
        f.chmod(0o755)
    return d


def _fake_train(cluster, shared, fake_bin, hh_file, name: str, *opts, **env) -> tuple[str, Path, Path]:
    """sbatch slurm/train.sbatch with the fake hhdpo; returns (job id, -o file, run_dir)."""
    run = shared / name
    e = _env(cluster.env, **env)
    e["HHDPO_BIN"] = str(fake_bin)
    job = _sbatch_train(cluster, shared, shared / f"{name}-%j.out", [f"run_dir={run}", f"dataset.dataset_name={hh_file}"],
                        *opts, env=e)
    return job, shared / f"{name}-{job}.out", run


def test_train_ranks_meet_on_the_nodeaddr_and_a_failed_rank_ends_the_step(slurm_cluster, shared, fake_bin, hh_file):
    """2 nodes x 1 rank: MASTER_ADDR is n1's NodeAddr (127.0.0.1 here; the name n1 resolves only
    through this cluster's /etc/hosts line), and with --kill-on-bad-exit=1 rank 1 failing ends rank 0
    (300 s in a "collective") at once: the job fails within seconds, not at the collective's timeout."""
    c = slurm_cluster
    addr = c.run("scontrol", "-o", "show", "node", "n1").stdout
    assert " NodeAddr=127.0.0.1 " in addr, addr
    job, out, _ = _fake_train(c, shared, fake_bin, hh_file, "fail", "-N", "2", FAKE_RANKS="fail")
    assert c.wait_job(job, timeout=600) == "FAILED", _read(out)
    text = _read(out)
    for rank, node in ((0, "n1"), (1, "n2")):
        assert f"fake rank {rank} of 2 on {node}: MASTER_ADDR=127.0.0.1 cpus=1 train" in text, text
    assert "the ranks meet on 127.0.0.1 (the NodeAddr of n1)" in text
    assert "outlived" not in text and "training step exited" in text, text
    assert "fake rank 1: failing" in text, text
    step = next(r for r in c.sacct(job, ("JobID", "Elapsed"), steps=True) if r["JobID"] == f"{job}.0")
    h, m, sec = map(int, step["Elapsed"].split("-")[-1].split(":"))
    assert h * 3600 + m * 60 + sec < 120, step


def test_train_ranks_follow_the_gpus_not_the_headers_one_task_per_node(slurm_cluster, shared, fake_bin, hh_file):
    """`sbatch --gpus-per-node=2 slurm/train.sbatch` keeps the header's --ntasks-per-node=1. This
    cluster has no GPUs: SLURM_GPUS_ON_NODE=2 comes from the submitting environment (sbatch exports
    it; slurmd sets it only for real GPUs). With one CPU on the node for the job, nothing starts:
    exit 2 naming the options, before job-start and before any step. With --cpus-per-task=2 the
    step runs 2 ranks of 1 CPU each on the one node."""
    c = slurm_cluster
    job, out, run = _fake_train(c, shared, fake_bin, hh_file, "gpus-short", SLURM_GPUS_ON_NODE="2")
    job_ok, out_ok, _ = _fake_train(c, shared, fake_bin, hh_file, "gpus-ok", "--cpus-per-task=2", SLURM_GPUS_ON_NODE="2")
    assert c.wait_job(job, timeout=600) == "FAILED", _read(out)
    text = _read(out)
    assert "2 GPU(s) per node make 2 rank(s) per node, but the job has 1 CPU(s) per node" in text, text
    assert "add --ntasks-per-node=2 --cpus-per-task=N" in text, text
    assert [r["JobID"] for r in c.sacct(job, ("JobID", "ExitCode"), steps=True)] == [job, f"{job}.batch"]
    assert not (run / "slurm").exists()  # job-start never ran: no log directory, no marker removed
    assert c.wait_job(job_ok, timeout=600) == "COMPLETED", _read(out_ok)
    text = _read(out_ok)
    assert "train: 2 rank(s) per node, one per GPU (the job has --ntasks-per-node=1), 1 CPU(s) each of the node's 2" in text
    for rank in (0, 1):
        assert re.search(rf"^fake rank {rank} of 2 on (n1|n2): MASTER_ADDR=127.0.0.1 cpus=1 train$", text, re.MULTILINE), text


def test_ranks_stopping_with_42_are_no_bad_exit_and_the_job_requeues(slurm_cluster, shared, fake_bin, hh_file):
    """42 is the ranks' agreed stop after one checkpoint saved together; a rank that gets there first
    must not make --kill-on-bad-exit kill one still writing. The step counts as 42: requeued, and
    the next attempt completes."""
    c = slurm_cluster
    job, out, _ = _fake_train(c, shared, fake_bin, hh_file, "stop42", "-N", "2", FAKE_RANKS="stop42")
    assert c.wait_job(job, timeout=600) == "COMPLETED", _read(out)
    text = _read(out)
    assert "fake rank 1: checkpoint written" in text, text  # rank 0 had exited 42 three seconds before
    assert "training step: 2 of 2 rank(s) exited 42" in text and "preemption; requeueing" in text, text
    assert f"train: job {job} attempt 1 on n1,n2" in text and "train complete" in text, text


@pytest.mark.parametrize("sig", ["USR2", "TERM"])
def test_lines_printed_after_a_stop_signal_reach_both_logs(slurm_cluster, shared, fake_bin, hh_file, sig):
    """A signal to the whole job (`scancel --full`; a time limit's SIGTERM) reaches every process
    of the batch step too, its tee included: what comes out of the step after it must still reach
    the -o file (tee's stdout) and the attempt log. USR2: srun passes it on, the ranks save and say
    so. SIGTERM: srun answers it by SIGKILLing the step (what srun does; why the stop signal must
    reach the ranks, not the batch step: --signal=USR2@300 without B:); its own lines remain."""
    c = slurm_cluster
    job, out, run = _fake_train(c, shared, fake_bin, hh_file, f"signals-{sig}", "--ntasks-per-node=2", FAKE_RANKS="signals")
    log = run / "slurm" / "logs" / f"train-{job}-attempt0.log"
    c.wait_for(lambda: _read(log).count(": ready") == 2 or c.job_state(job) not in (None, "PENDING", "RUNNING"), 600,
               f"job {job}: both ranks ready")
    c.run("scancel", "--full", f"--signal={sig}", job)
    state = c.wait_job(job, timeout=300)
    if sig == "USR2":
        assert state == "COMPLETED", _read(out)
        after = [f"fake rank {r}: {what}" for r in (0, 1) for what in ("got USR2, saving", "line printed after USR2")]
    else:
        assert state == "FAILED", _read(out)
        after = ["srun: forcing job termination", "tasks 0-1: Killed"]
    for text in (_read(out), _read(log)):
        for line in after:
            assert line in text, text
    assert f"batch shell: got SIG{sig} while the training step ran" in _read(out)


@pytest.fixture(scope="module")
def jobs(slurm_cluster, shared, tiny, hh_file):
    """Every job of the cluster tests, submitted at once; SLURM runs them side by side as the four
    CPUs (two per node) free up. Two threads act on running jobs: USR2 to one 2-node training once
    it logged step 2, and a shorter time limit for the timeout job once it trains.

    - full, preempted: 2 nodes x 1 rank each, the same tiny training; preempted gets USR2
    - timeout: 1 node, 1 task (hhdpo train runs its own torchrun), HHDPO_MAX_TIMEOUT_REQUEUES=0
    - pipe: slurm/pipeline.sh's whole chain on SmolLM2, from another working directory
    - failing: slurm/pipeline.sh whose training fails (its data file does not exist)
    """
    c = slurm_cluster
    t0 = time.monotonic()
    # the pipeline first: its three jobs in a row are the longest path
    cwd = shared / "elsewhere"  # pipeline.sh from any working directory: run_dir=pipe is relative to it
    cwd.mkdir()
    pipe_args = [CFG, "run_dir=pipe", f"dataset.dataset_name={hh_file}", f"HH_test.hh_test={hh_file}", *PIPE_ARGS]
    pipe = _pipeline(c, cwd, *pipe_args)
    assert pipe.returncode == 0, pipe.stderr
    # while the chain is queued or running, another submission of the same run is refused
    busy = _pipeline(c, cwd, *pipe_args, "--dry-run")
    failing = _pipeline(c, shared, CFG, f"run_dir={shared / 'failing'}",
                        f"dataset.dataset_name={shared / 'missing.jsonl.gz'}")
    assert failing.returncode == 0, failing.stderr
    runs = {name: shared / name for name in ("full", "preempted", "timeout")}
    ids = {name: _sbatch_train(c, shared, shared / f"{name}-%j.out", tiny_train(hh_file, runs[name], tiny),
                               "-N", "2", "-t", "20") for name in ("full", "preempted")}
    ids["timeout"] = _sbatch_train(
        c, shared, shared / "timeout-%j.out", tiny_train(hh_file, runs["timeout"], tiny, **{"dpo_training.max_steps": 100000}),
        "-t", "20", "--signal=USR2@60", env=_env(c.env, HHDPO_SIGNAL_LEAD="60", HHDPO_MAX_TIMEOUT_REQUEUES="0"))

    def preempt():
        pre = ids["preempted"]
        c.wait_for(lambda: _steps_logged(runs["preempted"]) >= 2 or c.job_state(pre) not in (None, "PENDING", "RUNNING"),
                   600, f"job {pre} at step 2")
        c.run("scancel", "--full", "--signal=USR2", pre)  # the batch step too: its tee must outlive USR2

    def shorten_time_limit():
        job = ids["timeout"]
        c.wait_for(lambda: _steps_logged(runs["timeout"]) >= 1 or c.job_state(job) not in (None, "PENDING", "RUNNING"),
                   600, f"job {job} training")
        # 120 s left: the signal comes at slurmctld's next time-limit check (every 30 s) that finds
        # at most the 60 s lead + 30 s left, and the step ends well before the limit
        limit = int(hs.parse_time_left(c.job_info(job)["RunTime"])) + 120
        c.run("scontrol", "update", f"JobId={job}", f"TimeLimit={limit // 3600}:{limit % 3600 // 60:02d}:{limit % 60:02d}")

    def downstream_reasons():  # read at once: slurmctld forgets a finished job after MinJobAge (60 s)
        out = {}
        for stage, job in _ids(failing.stdout).items():
            if stage != "train":
                out[stage] = (c.wait_job(job, timeout=900), c.job_info(job).get("Reason"))
        return out

    with ThreadPoolExecutor(3) as pool:
        actions = {"preempt": pool.submit(preempt), "shorten": pool.submit(shorten_time_limit),
                   "downstream": pool.submit(downstream_reasons)}
        yield SimpleNamespace(ids=ids, runs=runs, out={n: shared / f"{n}-{j}.out" for n, j in ids.items()},
                              actions=actions, pipe=pipe, pipe_args=pipe_args, pipe_cwd=cwd, busy=busy,
                              failing=failing, t0=t0)
        for a in actions.values():  # a test that did not get to wait for its action
            a.cancel()


@pytest.mark.slow
def test_train_sbatch_on_two_nodes_writes_the_hf_model(slurm_cluster, jobs):
    job, run, out = jobs.ids["full"], jobs.runs["full"], jobs.out["full"]
    assert slurm_cluster.wait_job(job, timeout=900) == "COMPLETED", _read(out)[-3000:]
    text = _read(out)
    assert "[train] attempt=0 world=2 device=cpu backend=gloo" in text, text[-3000:]  # the trainer logs the attempt
    assert {"[slurm] rank 0 of 2 on n1", "[slurm] rank 1 of 2 on n2"} <= set(text.splitlines()), text[-3000:]
    assert "on n1,n2 (run_dir" in text
    hf = run / "model"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (hf / "model.safetensors").stat().st_size > 0 and (hf / "tokenizer.json").is_file()
    assert [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))
    marker = json.loads((run / "slurm" / "done" / "train.json").read_text())
    assert marker["job_id"] == job and marker["config_hash"] == hs.stage_hash(load_config(hf / "config.yaml"), "train")
    # the per-attempt log holds what the -o file holds for that attempt
    (log,) = _attempt_logs(run, "train", job)
    assert "[train] saved Hugging Face model" in _read(log) and "rank 1 of 2 on n2" in _read(log)


@pytest.mark.slow
def test_usr2_mid_run_requeues_itself_and_resumes_with_the_same_losses(slurm_cluster, jobs):
    job, run, out = jobs.ids["preempted"], jobs.runs["preempted"], jobs.out["preempted"]
    jobs.actions["preempt"].result()
    assert slurm_cluster.wait_job(job, timeout=900) == "COMPLETED", _read(out)[-4000:]
    text = _read(out)
    m = re.search(r"\[train\] preempted at step (\d+): checkpoint saved", text)
    assert m and 2 <= int(m.group(1)) < STEPS, text[-4000:]
    assert "preemption; requeueing" in text and "timeout;" not in text
    assert "batch shell: got SIGUSR2 while the training step ran" in text  # tee got it too, and the lines still came
    assert re.search(rf"\[ckpt\] resumed from .*step_{int(m.group(1)):07d} at step {m.group(1)}", text), text[-4000:]
    # two attempts, each with its own log, and the -o file holding both
    logs = _attempt_logs(run, "train", job)
    assert [p.name for p in logs] == [f"train-{job}-attempt0.log", f"train-{job}-attempt1.log"]
    assert "preempted at step" in _read(logs[0]) and "resumed from" not in _read(logs[0])
    assert "resumed from" in _read(logs[1]) and "saved Hugging Face model" in _read(logs[1])
    assert f"train: job {job} attempt 1 on n1,n2" in text
    slurm_cluster.wait_for(lambda: [r["State"] for r in slurm_cluster.sacct(job, duplicates=True)] == ["REQUEUED", "COMPLETED"],
                           30, f"sacct {job}: REQUEUED, COMPLETED")
    # the same per-step losses as the uninterrupted run
    assert slurm_cluster.wait_job(jobs.ids["full"], timeout=900) == "COMPLETED"
    full, resumed = _losses(jobs.runs["full"]), _losses(run)
    assert [s for s, _ in resumed] == [s for s, _ in full] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in resumed], [v for _, v in full], rtol=1e-5)


@pytest.mark.slow
def test_time_limit_signal_is_a_timeout_and_the_cap_stops_requeueing(slurm_cluster, jobs):
    """SLURM's own --signal before the time limit (the limit shortened once training runs): the job
    says timeout, not preemption, and with HHDPO_MAX_TIMEOUT_REQUEUES=0 it is not requeued but
    ends with 42 and its checkpoint."""
    c = slurm_cluster
    job, run, out = jobs.ids["timeout"], jobs.runs["timeout"], jobs.out["timeout"]
    jobs.actions["shorten"].result()
    assert c.wait_job(job, timeout=900) == "FAILED", _read(out)[-3000:]
    text = _read(out)
    assert "[train] preempted at step" in text
    assert "timeout; not requeued, 0 timeout requeue(s) already (HHDPO_MAX_TIMEOUT_REQUEUES=0)" in text, text[-3000:]
    assert "preemption" not in text
    rows = c.wait_for(lambda: [r for r in c.sacct(job, duplicates=True) if r["ExitCode"] == "42:0"], 30,
                      f"sacct {job} exit 42")
    assert [r["State"] for r in rows] == ["FAILED"]
    assert json.loads((run / "model" / "run_state.json").read_text())["status"] == "preempted"
    assert list((run / "model" / "checkpoints").glob("step_*/meta.json"))


# SmolLM2, tiny. Generation through transformers (the vLLM path is tested in test_generate and
# test_eval_e2e); the judge is the local vLLM one, as in `hhdpo eval` without a key.
PIPE_ARGS = ("dataset.subset=train[:64]", "dataset.max_len=64", "dataset.max_prompt_len=40", "dataset.val_ratio=0",
             "dpo_training.batch_size=2", "dpo_training.max_steps=2", "dpo_training.log_steps=1", "checkpoint.save_steps=0",
             "HH_test.num_sample=4", "HH_test.max_new_tokens=16", "HH_test.backend=transformers",
             "judge.max_output_tokens=32", "judge.concurrency=4")


def _pipeline(cluster, cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(PIPELINE), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=_env(cluster.env), timeout=120, check=False)


def _ids(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^(train|generate|judge): job (\d+)$", stdout, re.MULTILINE))


@pytest.mark.slow
@pytest.mark.vllm
def test_pipeline_runs_the_chain_to_a_summary_and_skips_it_when_complete(slurm_cluster, jobs):
    c = slurm_cluster
    ids, run = _ids(jobs.pipe.stdout), jobs.pipe_cwd / "pipe"
    assert list(ids) == ["train", "generate", "judge"] and f"run_dir: {run}" in jobs.pipe.stdout, jobs.pipe.stdout
    assert jobs.busy.returncode == 2 and "of an earlier submission are still queued or running" in jobs.busy.stderr
    logs = run / "slurm" / "logs"
    for stage, job in ids.items():
        state = c.wait_job(job, timeout=1200)
        assert state == "COMPLETED", _read(logs / f"hhdpo-{stage}-{job}.out")[-4000:]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert {r["label"]: r["n"] for r in summary["files"]} == {"policy": 4, "base": 4}
    for name in ("policy", "base"):
        assert len(read_jsonl(run / "eval" / f"{name}_out.jsonl")) == 4
        assert len(read_jsonl(run / "eval" / f"{name}_judged.jsonl")) == 4
    assert "| policy" in _read(logs / f"hhdpo-judge-{ids['judge']}.out")  # the summary table
    assert sorted(p.name for p in (run / "slurm" / "done").iterdir()) == ["generate.json", "judge.json", "train.json"]

    # the same run again: every stage is complete, nothing is submitted
    again = _pipeline(c, jobs.pipe_cwd, *jobs.pipe_args)
    assert again.returncode == 0 and "every stage is complete; nothing submitted" in again.stdout, again.stderr
    assert not _ids(again.stdout)
    # another judging setting: only the judge stage, with no dependency
    dry = _pipeline(c, jobs.pipe_cwd, *jobs.pipe_args, "judge.max_output_tokens=24", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "# train: complete" in dry.stdout and "# generate: complete" in dry.stdout
    assert dry.stdout.count("$(sbatch ") == 1 and "judge_job=$(sbatch" in dry.stdout and "--dependency" not in dry.stdout
    print(f"every cluster job of this module done {time.monotonic() - jobs.t0:.0f} s after submission")


@pytest.mark.slow
def test_failed_train_job_cancels_the_chain_and_writes_nothing_downstream(slurm_cluster, shared, jobs):
    """The config loads (so pipeline.sh submits) but training fails: its data file does not exist."""
    c = slurm_cluster
    ids = _ids(jobs.failing.stdout)
    assert c.wait_job(ids["train"], timeout=900) == "FAILED"
    assert jobs.actions["downstream"].result() == {"generate": ("CANCELLED", "DependencyNeverSatisfied"),
                                                   "judge": ("CANCELLED", "DependencyNeverSatisfied")}
    run = shared / "failing"
    logs = run / "slurm" / "logs"
    assert "missing.jsonl.gz: data file or directory not found" in _read(logs / f"hhdpo-train-{ids['train']}.out")
    assert sorted(p.name for p in logs.iterdir()) == [f"hhdpo-train-{ids['train']}.out", f"train-{ids['train']}-attempt0.log"]
    assert not (run / "eval").exists() and not (run / "slurm" / "done").exists()
    # never started: no batch step and no nodes. Not sacct's Start, which for a job cancelled while
    # pending may hold the scheduler's expected start time (seen in CI on a busy cluster)
    rows = {r["JobID"]: r for r in c.sacct(",".join(ids.values()), ("JobID", "ExitCode", "NodeList"), steps=True)}
    assert rows[ids["train"]]["ExitCode"] == "2:0" and f"{ids['train']}.batch" in rows
    for stage in ("generate", "judge"):
        assert rows[ids[stage]]["NodeList"] == "None assigned", rows
        assert not [j for j in rows if j.startswith(f"{ids[stage]}.")], rows
