"""After a training step exited 42 (checkpoint saved) in an sbatch job: requeue it or not.

A time-limit stop is told from a preemption by the time left when the step ended: within the
``--signal`` lead (plus SLURM's check interval) it was the time limit. Timeout requeues are capped
per job so that a job that never progresses does not loop; preemptions always requeue.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from hhdpo.core.config import ConfigError

# keep equal to train.sbatch's `#SBATCH --signal=USR2@300`; HHDPO_SIGNAL_LEAD when --signal is changed
DEFAULT_SIGNAL_LEAD = 300
# SLURM's time-limit check runs periodically: the signal may come up to a minute before the lead
SIGNAL_SLACK = 60
DEFAULT_MAX_TIMEOUT_REQUEUES = 3


def parse_time_left(text: str) -> int | None:
    """squeue's ``%L`` ([D-]HH:MM:SS, MM:SS or SS) in seconds; None for UNLIMITED/NOT_SET/INVALID."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(?:(\d+):)?(\d+)", text.strip())
    if not m:
        return None
    d, a, b, s = m.groups()
    h, mins = (int(a), int(b)) if b is not None else (0, int(a or 0))
    return ((int(d or 0) * 24 + h) * 60 + mins) * 60 + int(s)


def stop_reason(time_left: int | None, lead: int) -> str:
    """``timeout`` when the job stopped within the ``--signal`` lead of its time limit (the signal
    SLURM sends before the limit), ``preemption`` otherwise (scancel --signal, a preempting job).
    ``time_left`` None means no time limit: only a preemption can have stopped it."""
    return "timeout" if time_left is not None and time_left <= lead + SIGNAL_SLACK else "preemption"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None


def requeue_decision(run_dir: Path, job_id: str, time_left: int | None | str) -> tuple[bool, str]:
    """After the training step exited 42 (checkpoint saved): requeue or not, and the log line.

    Preemptions always requeue. Timeouts requeue at most HHDPO_MAX_TIMEOUT_REQUEUES times per job
    (counted in ``<run_dir>/slurm/train-<job>.timeouts``): a job that makes no progress within its
    time limit would otherwise time out and requeue forever. ``time_left`` "unknown" (squeue
    failed) counts as a timeout, so that the cap still bounds the loop."""
    lead = _env_int("HHDPO_SIGNAL_LEAD", DEFAULT_SIGNAL_LEAD)
    cap = _env_int("HHDPO_MAX_TIMEOUT_REQUEUES", DEFAULT_MAX_TIMEOUT_REQUEUES)
    if time_left == "unknown":
        left, reason = "time left unknown (squeue failed)", "timeout"
    else:
        left = "no time limit" if time_left is None else f"{time_left} s left of the time limit"
        reason = stop_reason(time_left, lead)
    if reason == "preemption":
        return True, (f"stopped by a signal with {left} (more than the {lead} s signal lead + {SIGNAL_SLACK} s): "
                      "preemption; requeueing")
    counter = Path(run_dir) / "slurm" / f"train-{job_id}.timeouts"
    done = int(counter.read_text() or 0) if counter.is_file() else 0
    if done >= cap:
        return False, (f"stopped at the time limit ({left}, signal lead {lead} s): timeout; not requeued, "
                       f"{done} timeout requeue(s) already (HHDPO_MAX_TIMEOUT_REQUEUES={cap}). The checkpoint is "
                       "saved: resubmit the same command (with a longer --time) to continue")
    counter.parent.mkdir(parents=True, exist_ok=True)
    counter.write_text(f"{done + 1}\n")
    return True, (f"stopped at the time limit ({left}, signal lead {lead} s): timeout; requeueing "
                  f"(timeout requeue {done + 1} of at most {cap})")


def squeue_time_left(job_id: str) -> int | None | str:
    """Seconds left of the job's time limit, None without a limit, "unknown" when squeue fails."""
    try:
        p = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, check=False,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = p.stdout.strip()
    if p.returncode != 0 or not text:
        return "unknown"
    return parse_time_left(text)
