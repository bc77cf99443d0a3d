"""The distributed environment a process finds itself in, and stop signals held during start-up.

- Under ``torchrun`` (RANK/WORLD_SIZE set): join its process group.
- Inside an ``srun`` step with one task per rank (SLURM_STEP_NUM_TASKS >= 2, no RANK): derive
  RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous address (MASTER_ADDR when set, as
  slurm/train.sbatch sets it, else the first node of the step as SLURM reaches it: its NodeAddr;
  a port from the job id) from SLURM's environment.

No torch import here: ``hhdpo train`` holds stop signals before torch is imported.
"""

from __future__ import annotations

import os
import signal
import subprocess

STATE_REPORTED_BY_LAUNCHER = "HHDPO_LAUNCHER_READS_STATE"  # set for the workers of run_under_torchrun


def threads_per_process(processes: int) -> str:
    """OMP_NUM_THREADS for one of ``processes`` sharing this machine: the environment's value, else
    an equal share of the CPUs this process may use (its affinity: a cgroup or SLURM's binding, not
    every core of the node). torch starts a thread per core otherwise, and processes sharing the
    cores spin against each other (2 trainings on 2 cores: 150 s at 2 threads each, 45 s at 1)."""
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // max(1, processes)))


def in_distributed_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def adopt_slurm_env() -> bool:
    """Map an srun step's per-task environment onto torch.distributed's; True if it applied.

    Only inside an srun step with several tasks (``SLURM_STEP_NUM_TASKS`` >= 2): a batch script
    also has ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N`` before any srun, and adopting those would
    make it wait as rank 0 of N for ranks that never start.
    """
    from hhdpo.core.config import ConfigError

    env = os.environ
    if in_distributed_env() or "SLURM_PROCID" not in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) < 2:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    node = int(env.get("SLURM_NODEID", "0"))
    env["LOCAL_WORLD_SIZE"] = str(expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"))[node])
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                   capture_output=True, text=True, check=True).stdout.split()
        except (OSError, subprocess.CalledProcessError) as e:
            raise ConfigError(f"under srun: cannot expand SLURM_STEP_NODELIST={nodelist!r} with `scontrol show "
                              f"hostnames` ({e}); set MASTER_ADDR to the first node's address") from None
        env["MASTER_ADDR"] = node_addr(hosts[0])
    env.setdefault("MASTER_PORT", str(rendezvous_port(int(env.get("SLURM_JOB_ID", "0")))))
    return True


def node_addr(node: str) -> str:
    """The address SLURM reaches ``node`` at: its ``NodeAddr`` (``scontrol show node``), which is the
    node name itself unless slurm.conf gives another. A NodeName need not resolve anywhere (only a
    cluster's /etc/hosts may map it); the NodeAddr is what slurmctld itself connects to. ``node``
    when scontrol cannot say."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    addr = next((tok.partition("=")[2] for tok in out.split() if tok.startswith("NodeAddr=")), "")
    return addr or node


def rendezvous_port(job_id: int) -> int:
    """A port per job in [20000, 32000): below Linux's ephemeral range (32768+), so no client socket holds it."""
    return 20000 + job_id % 12000


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed tasks-per-node list, e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    out = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        out += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return out


_HELD: list[int] = []


def hold_stop_signals() -> None:
    """Until the trainer installs its own handlers, remember SIGTERM/SIGUSR2 instead of dying of
    them: a preemption that arrives while torch imports and the model loads then still ends in a
    checkpoint and exit 42 at the first step (``hhdpo train`` calls this before importing torch)."""
    for s in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(s, lambda signum, _frame: _HELD.append(signum))


def held_signal() -> int:
    """The last stop signal held by :func:`hold_stop_signals` (0: none)."""
    return _HELD[-1] if _HELD else 0
