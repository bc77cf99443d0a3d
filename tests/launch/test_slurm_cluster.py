"""Smoke tests of the local SLURM cluster (slurm/cluster/start.sh): two nodes, job dependencies,
requeue, signal delivery, accounting, and a 2-node gloo rendezvous on n1 by name. Every job is tiny:
the two nodes share this machine's cores."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.slurm_cluster import REPO, START, STOP


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_start_is_a_noop_when_up(slurm_cluster):
    t = time.monotonic()
    p = slurm_cluster.run("bash", START, slurm_cluster.dir)
    assert time.monotonic() - t < 10
    assert "already up" in p.stderr
    assert f"export SLURM_CONF={slurm_cluster.conf}" in p.stdout.splitlines()
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split("\n")
    assert sorted(n.split()[0] for n in nodes if n) == ["n1", "n2"]


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, f"shellcheck missing: {START} --install installs it"
    # -x from the repo root: start.sh sources docker/apt-install.sh, checked with it
    p = subprocess.run([shellcheck, "-x", START, STOP], check=False, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def test_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "two-nodes.out"
    # 1 task per node with all of a node's cpus, as multi-node training asks for
    cpus = slurm_cluster.run("sinfo", "-h", "-N", "-n", "n1", "-o", "%c").stdout.split()[0]
    job = slurm_cluster.sbatch("-N", "2", "--ntasks-per-node", "1", "--cpus-per-task", cpus, "-t", "2",
                               "-o", out, "--wrap",
                               "srun hostname; srun printenv SLURMD_NODENAME; srun -l getent hosts n1 n2")
    assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED", _read(out)
    lines = _read(out).splitlines()
    assert {"n1", "n2"} <= set(lines), lines
    assert sum(line.split()[1:2] == ["127.0.0.1"] for line in lines) == 4, lines  # n1, n2 on both
    # slurmdbd records are eventually consistent: the node list may lag the final state a moment
    expected = [{"JobID": job, "State": "COMPLETED", "ExitCode": "0:0", "NodeList": "n[1-2]"}]
    slurm_cluster.wait_for(lambda: slurm_cluster.sacct(job) == expected, 30, f"sacct {job} == {expected}")


def test_dependency_chain_cancels_downstream_of_a_failure(slurm_cluster, tmp_path):
    ran = tmp_path / "ran"
    dep = ("--kill-on-invalid-dep=yes", "-t", "1", "-o", tmp_path / "%j.out")
    ok = slurm_cluster.sbatch(*dep, "--wrap", f"echo ok >> {ran}")
    bad = slurm_cluster.sbatch(f"--dependency=afterok:{ok}", *dep, "--wrap", f"echo bad >> {ran}; exit 3")
    after = slurm_cluster.sbatch(f"--dependency=afterok:{bad}", *dep, "--wrap", f"echo after >> {ran}")
    assert slurm_cluster.wait_job(after, timeout=60) == "CANCELLED"
    assert slurm_cluster.job_info(after)["Reason"] == "DependencyNeverSatisfied"
    assert slurm_cluster.wait_job(ok, timeout=30) == "COMPLETED"
    assert slurm_cluster.wait_job(bad, timeout=30) == "FAILED"
    assert _read(ran).split() == ["ok", "bad"]  # the cancelled job never ran
    rows = {r["JobID"]: r for r in slurm_cluster.sacct(f"{ok},{bad},{after}")}
    assert rows[ok]["State"] == "COMPLETED"
    assert rows[bad]["State"] == "FAILED" and rows[bad]["ExitCode"] == "3:0"
    assert rows[after]["State"].startswith("CANCELLED")


REQUEUE_SCRIPT = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH -t 2
echo "attempt ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60  # SIGTERM ends the job; the shell may still run a line or two after its child dies
    exit 1
fi
echo "done ${SLURM_RESTART_COUNT:-0}"
"""


def test_requeue_runs_again_with_restart_count(slurm_cluster, tmp_path):
    script = tmp_path / "requeue.sbatch"
    script.write_text(REQUEUE_SCRIPT)
    out = tmp_path / "requeue.out"
    job = slurm_cluster.sbatch("-o", out, script)
    assert slurm_cluster.wait_job(job, timeout=90) == "COMPLETED", _read(out)
    lines = [line for line in _read(out).splitlines() if line.startswith(("attempt", "done"))]
    assert lines == ["attempt 0", "attempt 1", "done 1"], _read(out)
    states = [r["State"] for r in slurm_cluster.sacct(job, duplicates=True)]
    assert states == ["REQUEUED", "COMPLETED"], states


SIGNAL_SCRIPT = """#!/bin/bash
#SBATCH -t 2
trap 'echo "batch: USR2"' USR2
srun -n1 bash -c 'trap "echo task: USR2; exit 0" USR2; echo step-ready; for i in $(seq 600); do sleep 0.1; done' &
while kill -0 $! 2>/dev/null; do wait $!; done
echo "batch: end"
"""


@pytest.mark.parametrize("flags, batch, task", [
    ((), False, True),              # default: every task of every step, not the batch shell
    (("--full",), True, True),      # the batch shell and its children, and the steps
    (("--batch",), True, False),    # the batch shell only
], ids=["steps", "full", "batch"])
def test_scancel_signal_usr2(slurm_cluster, tmp_path, flags, batch, task):
    script = tmp_path / "signal.sbatch"
    script.write_text(SIGNAL_SCRIPT)
    out = tmp_path / "signal.out"
    job = slurm_cluster.sbatch("-o", out, script)
    slurm_cluster.wait_for(lambda: "step-ready" in _read(out), 60, f"job {job} step running")
    slurm_cluster.run("scancel", *flags, "--signal=USR2", job)
    if task:
        assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED"
    else:
        slurm_cluster.wait_for(lambda: "batch: USR2" in _read(out), 30, "batch shell trap")
        time.sleep(1)
        slurm_cluster.run("scancel", job)
        slurm_cluster.wait_job(job, timeout=60)
    text = _read(out)
    assert ("batch: USR2" in text) == batch, text
    assert ("task: USR2" in text) == task, text


GLOO = """
import os, datetime, torch, torch.distributed as dist
rank = int(os.environ["SLURM_PROCID"])
dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["SLURM_NTASKS"]),
                        timeout=datetime.timedelta(seconds=60))
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(f"rank {rank} of {dist.get_world_size()} on {os.environ['SLURMD_NODENAME']}: sum {t.item():g}", flush=True)
dist.destroy_process_group()
"""


def test_gloo_rendezvous_on_n1_by_name(slurm_cluster, tmp_path):
    """Two nodes x one task, MASTER_ADDR=n1 (a node name, as train.sbatch will use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "gloo.py").write_text(GLOO)
    out = tmp_path / "gloo.out"
    job = slurm_cluster.sbatch("-N", "2", "--ntasks-per-node", "1", "-t", "3", "-o", out, "--wrap",
                               f"export MASTER_ADDR=n1 MASTER_PORT={port}; "
                               f"srun {sys.executable} {tmp_path / 'gloo.py'}", cwd=REPO)
    assert slurm_cluster.wait_job(job, timeout=180) == "COMPLETED", _read(out)
    lines = sorted(line for line in _read(out).splitlines() if line.startswith("rank "))
    assert lines == ["rank 0 of 2 on n1: sum 3", "rank 1 of 2 on n2: sum 3"], _read(out)


def _double(x):
    import os

    return 2 * x, os.environ.get("SLURMD_NODENAME")


def test_submitit_sees_results_and_cancellations(slurm_cluster, tmp_path):
    """submitit reads final states from sacct: a cancelled job must end job.result(), not hang."""
    import submitit

    ex = submitit.SlurmExecutor(folder=tmp_path / "%j")
    ex.update_parameters(time=2, nodes=1, ntasks_per_node=1, cpus_per_task=1, partition="debug")
    value, node = ex.submit(_double, 21).result()
    assert value == 42 and node in {"n1", "n2"}
    job = ex.submit(time.sleep, 120)
    slurm_cluster.wait_for(lambda: slurm_cluster.job_state(job.job_id) == "RUNNING", 60, "submitit job running")
    job.cancel()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    assert job.state.startswith("CANCELLED")
