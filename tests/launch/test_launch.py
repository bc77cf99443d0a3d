"""Launch plumbing: SLURM environment adoption, and SIGUSR2 through the self-launched torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hhdpo.core import distenv
from hhdpo.core.config import ConfigError
from tests.conftest import REPO

DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    saved = dict(os.environ)  # adopt_slurm_env writes os.environ itself
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in DIST_KEYS:
            monkeypatch.delenv(k)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_batch_script_environment_is_not_adopted(clean_env):
    """`sbatch -N 2 --wrap "hhdpo train ..."`: the batch shell has SLURM_PROCID=0, SLURM_NTASKS=2 but no step."""
    for k, v in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]"}.items():
        clean_env.setenv(k, v)
    assert distenv.adopt_slurm_env() is False
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_srun_step_environment_is_adopted(clean_env):
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "12345",
           "SLURM_STEP_NODELIST": "n[1-2]", "MASTER_ADDR": "n1"}
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert distenv.adopt_slurm_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == \
        ("3", "4", "1", "2")
    assert os.environ["MASTER_PORT"] == str(20000 + 12345 % 12000)


def test_missing_scontrol_is_a_clear_error(clean_env):
    for k, v in {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]",
                 "PATH": "/nonexistent"}.items():
        clean_env.setenv(k, v)
    with pytest.raises(ConfigError, match="scontrol show hostnames.*MASTER_ADDR"):
        distenv.adopt_slurm_env()


FAKE_SCONTROL = """#!/bin/bash
# the test cluster's shape: node names that resolve nowhere, reached at their NodeAddr
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-a17\\ngpu-a18\\n'; exit 0; fi
if [[ $1 == -o && $2 == show && $3 == node ]]; then
    echo "NodeName=$4 Arch=x86_64 CoresPerSocket=16 NodeAddr=10.3.0.17 NodeHostName=$4 Version=22.05.8"
    exit 0
fi
exit 1
"""


def test_srun_ranks_meet_on_the_first_nodes_nodeaddr(clean_env, tmp_path):
    """No MASTER_ADDR from the batch script (a bare `srun hhdpo train`): the first node's NodeAddr,
    not its NodeName; a node scontrol knows no NodeAddr for keeps its name."""
    (tmp_path / "scontrol").write_text(FAKE_SCONTROL)
    (tmp_path / "scontrol").chmod(0o755)
    for k, v in {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                 "SLURM_STEP_NODELIST": "gpu-a[17-18]", "SLURM_JOB_ID": "5", "PATH": f"{tmp_path}:/usr/bin:/bin"}.items():
        clean_env.setenv(k, v)
    assert distenv.adopt_slurm_env() is True
    assert os.environ["MASTER_ADDR"] == "10.3.0.17"
    (tmp_path / "scontrol").write_text(FAKE_SCONTROL.replace("NodeAddr=10.3.0.17 ", ""))
    assert distenv.node_addr("gpu-a17") == "gpu-a17"


def test_tasks_per_node_and_port_range():
    assert distenv.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert distenv.expand_tasks_per_node("8") == [8]
    ports = {distenv.rendezvous_port(j) for j in range(0, 100_000, 7)}
    assert min(ports) >= 20000 and max(ports) < 32768  # below the ephemeral range


def _procs_with(needle: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


# a torchrun without --signals-to-handle / --shutdown-timeout (torch 2.11 has only the first; the
# GPU machines' images carry 2.11): the launcher must still get USR2 to the workers
OLD_TORCHRUN = "import sys, hhdpo.launch.torchrun as l, hhdpo.cli as c; l.torchrun_options = lambda: set(); c.main()"


@pytest.mark.parametrize("torchrun", ["current", "without_signal_options"])
def test_sigusr2_on_self_launched_torchrun_checkpoints_and_exits_42(tmp_path, hh_file, tiny_llama_dir, torchrun):
    """torchrun forwards only SIGTERM/INT/HUP/QUIT by default: USR2 must reach both workers, which save
    one checkpoint together; the launcher exits 42 and leaves no worker behind. An older torchrun,
    which cannot forward USR2, is handed SIGTERM instead."""
    save = tmp_path / "run"
    entry = ["-m", "hhdpo"] if torchrun == "current" else ["-c", OLD_TORCHRUN]
    cmd = [sys.executable, *entry, "train", "--config", "configs/smollm2_cpu.yaml", "--nproc-per-node", "2",
           f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", f"dataset.dataset_name={hh_file}",
           "dataset.subset=train[:400]", "dataset.val_ratio=0", "dataset.max_len=64", "dataset.max_prompt_len=40",
           "dpo_training.batch_size=1", "dpo_training.max_steps=200", "dpo_training.log_steps=1",
           f"dpo_training.save_dir={save}", "checkpoint.save_steps=0"]
    with open(tmp_path / "out", "w") as out_f, open(tmp_path / "err", "w") as err_f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out_f, stderr=err_f, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    metrics = save / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, \
            (tmp_path / "err").read_text()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    proc.wait(timeout=240)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 42, out[-3000:] + err[-3000:]
    assert ("has no --shutdown-timeout" in err) == (torchrun != "current"), err[-3000:]
    # the preemption ends with the trainer's own lines, not torchrun's SignalException traceback
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert out.rstrip().splitlines()[-1].startswith(f"[train] preempted at step {json.loads((save / 'run_state.json').read_text())['step']}: "
                                                    "checkpoint saved"), out[-3000:]
    state = json.loads((save / "run_state.json").read_text())
    assert state["status"] == "preempted" and 2 <= state["step"] < 200
    ckpts = sorted((save / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{state['step']:07d}"] and (ckpts[0] / "meta.json").is_file()
    time.sleep(1)
    assert _procs_with(str(save)) == [], "workers outlived the launcher"


NO_NETWORK = "ip link set lo up && hostname {host} && exec \"$@\""


@pytest.mark.parametrize("nproc", [1, 2])
def test_train_starts_at_once_without_a_network(tmp_path, hh_file, tiny_llama_dir, nproc):
    """`docker run --network=none`, `apptainer --network none`: only loopback, and a hostname that
    resolves to nothing (a network namespace and a UTS namespace of its own: `unshare -nu`). The
    ranks meet on 127.0.0.1, so training starts and ends; torchrun's --standalone waited 300 s on
    the hostname and died with DistNetworkError. The time limit is below that wait."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("this test needs root and unshare (util-linux) for a network namespace without network")
    save, host = tmp_path / "run", "hhdpo-no-such-host-4f2c"
    cmd = ["unshare", "-nu", "bash", "-c", NO_NETWORK.format(host=host), "no-network",
           sys.executable, "-m", "hhdpo", "train", "--config", "configs/smollm2_cpu.yaml", "--nproc-per-node", str(nproc),
           f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", f"dataset.dataset_name={hh_file}",
           "dataset.subset=train[:16]", "dataset.val_ratio=0", "dataset.max_len=64", "dataset.max_prompt_len=40",
           "dpo_training.batch_size=1", "dpo_training.max_steps=1", f"dpo_training.save_dir={save}",
           "checkpoint.save_steps=0"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280, check=False,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert f"[train] attempt=0 world={nproc}" in out and (save / "model.safetensors").is_file(), out[-4000:]
    # never tried to reach the hostname (it does not resolve in there)
    assert host not in out and "DistNetworkError" not in out, out[-4000:]
    print(f"no network, {nproc} rank(s): trained in {time.monotonic() - t0:.0f} s")


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    try:
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("SigCgt:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)


def test_stop_signal_during_start_up_is_held_until_the_first_step(tmp_path, hh_file, tiny_llama_dir):
    """An srun rank (rank and world from the step) sent USR2 before torch is even loaded: it must not
    die of the signal but train to its first step, checkpoint and exit 42, so the job requeues."""
    save = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(distenv.rendezvous_port(os.getpid())))
    cmd = [sys.executable, "-m", "hhdpo", "train", "--config", "configs/smollm2_cpu.yaml",
           f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", f"dataset.dataset_name={hh_file}",
           "dataset.subset=train[:64]", "dataset.val_ratio=0", "dataset.max_len=64", "dataset.max_prompt_len=40",
           "dpo_training.batch_size=1", "dpo_training.max_steps=50", f"dpo_training.save_dir={save}",
           "checkpoint.save_steps=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 60
    while not _catches(proc.pid, signal.SIGUSR2):
        assert proc.poll() is None and time.time() < deadline, "no SIGUSR2 handler"
        time.sleep(0.005)
    assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()  # still starting up
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 42, out[-3000:]
    state = json.loads((save / "run_state.json").read_text())
    assert state["status"] == "preempted" and state["step"] == 1, state
    assert (save / "checkpoints" / "step_0000001" / "meta.json").is_file()


def test_stop_signal_during_final_validation_checkpoints_and_a_rerun_completes(tmp_path, hh_file, tiny_llama_dir):
    """USR2 while the last step's validation runs: exit 42 with the step saved and no export (it
    used to be ignored until validation and export ended, past a time limit's signal lead); the
    same command then resumes at the last step, validates and exports."""
    save = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(distenv.rendezvous_port(os.getpid() + 1)))
    cmd = [sys.executable, "-m", "hhdpo", "train", "--config", "configs/smollm2_cpu.yaml",
           f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", f"dataset.dataset_name={hh_file}",
           "dataset.subset=train[:400]", "dataset.val_ratio=0.75", "dataset.max_len=64", "dataset.max_prompt_len=40",
           "dpo_training.batch_size=1", "dpo_training.max_steps=2", "dpo_training.log_steps=1",
           f"dpo_training.save_dir={save}", "checkpoint.save_steps=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = save / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and '"step": 2' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    time.sleep(1)  # into the 300 validation batches (several seconds even on a quiet machine)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 42, out[-3000:]
    assert json.loads((save / "run_state.json").read_text()) == {"status": "preempted", "step": 2, "total_steps": 2}
    assert (save / "checkpoints" / "step_0000002" / "meta.json").is_file() and not (save / "model.safetensors").exists()
    assert not any("eval/loss" in r for r in map(json.loads, metrics.read_text().splitlines()))
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout and (save / "model.safetensors").is_file()
    assert [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "eval/loss" in r] == [2]


def test_a_worker_dying_after_the_run_completed_is_a_warning_not_a_failure(tmp_path, monkeypatch, capsys):
    """gloo's teardown without a network has aborted a rank at exit, after the run completed and its
    files were written: torchrun's error table (naming the host) became a warning and exit 0. A worker
    that fails before the run completed (or a state from an earlier launch) is torchrun's error as before."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from hhdpo.launch import torchrun

    def failing(_argv):
        raise ChildFailedError("hhdpo", {1: ProcessFailure(local_rank=1, pid=123, exitcode=-6, error_file="")})

    monkeypatch.setattr(torch.distributed.run, "main", failing)
    state = tmp_path / "run_state.json"
    launched = time.time() - 1
    monkeypatch.setenv("HHDPO_LAUNCH_RUN_STATE", f"{state}@{launched}")
    state.write_text(json.dumps({"status": "completed", "step": 1}))
    assert torchrun.torchrun_main([]) == 0
    assert "rank 1 (exit -6) ended abnormally after the run completed" in capsys.readouterr().err
    for status, mtime in (("running", None), ("completed", launched - 60)):  # unfinished; an earlier launch's
        state.write_text(json.dumps({"status": status}))
        if mtime:
            os.utime(state, (mtime, mtime))
        with pytest.raises(ChildFailedError):
            torchrun.torchrun_main([])


def test_threads_per_process_is_a_share_of_this_process_cpus_unless_set(monkeypatch):
    """The launcher, submitit's jobs and the test workers all size OMP_NUM_THREADS with it: a share of
    the CPUs this process may use (its affinity, not the node's core count); the user's value wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 8, 9})
    assert [distenv.threads_per_process(n) for n in (1, 2, 4, 12)] == ["6", "3", "1", "1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert distenv.threads_per_process(2) == "5"
