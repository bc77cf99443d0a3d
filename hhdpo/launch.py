"""Process-group plumbing: join torchrun/srun, or become torchrun.

- Under ``torchrun`` (RANK/WORLD_SIZE set): join its process group.
- Under ``srun`` with one task per rank (SLURM_PROCID/SLURM_NTASKS set, no RANK): derive
  RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous address from SLURM's environment.
- Otherwise ``hhdpo train`` re-executes itself under ``torch.distributed.run`` with
  ``--nproc-per-node`` workers, forwarding SIGTERM/SIGUSR2 so a preempted job still
  checkpoints, and returns the trainer's own exit status (torchrun collapses it to 1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hhdpo.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED


def in_distributed_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def adopt_slurm_env() -> bool:
    """Map srun's per-task environment onto torch.distributed's; True if it applied."""
    env = os.environ
    if in_distributed_env() or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    if "MASTER_ADDR" not in env:
        nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        env["MASTER_ADDR"] = nodes[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return True


def run_under_torchrun(module: str, argv: list[str], nproc: int, state_file: Path | None) -> int:
    """Run ``python -m module argv`` as ``nproc`` torchrun workers on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    started = time.time()
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    # trust only a state written by this launch, not a stale one from an earlier run
    if state_file is not None and state_file.is_file() and state_file.stat().st_mtime >= started:
        status = json.loads(state_file.read_text()).get("status")
        return {"preempted": EXIT_PREEMPTED, "completed": EXIT_OK, "bad_input": EXIT_BAD_INPUT}.get(status, rc)
    return rc
