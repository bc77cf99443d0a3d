"""A real SLURM cluster on this host for the tests: munged, slurmctld, slurmdbd on a private MariaDB,
and two slurmd (nodes n1 and n2), started by ``slurm/cluster/start.sh`` and stopped by ``stop.sh``.

The session fixture ``slurm_cluster`` starts the cluster unless it is already up (start.sh is a
no-op then), exports ``SLURM_CONF`` into ``os.environ`` for the session (so that submitit, which
runs sbatch/sacct with the process environment, finds it), and yields a :class:`SlurmCluster` with
the environment for subprocesses and helpers (``sbatch``, ``wait_job``, ``sacct``, ``job_info``).

It stops the cluster at the end of the session only if a test session started it (not a person
or CI running start.sh) and no other test session is still using it: every session holds a shared
``flock`` on DIR/users.lock while it runs. ``HHDPO_SLURM_KEEP=1`` leaves it running for the next
session; ``HHDPO_SLURM_DIR`` picks the cluster directory (default /tmp/hhdpo-slurm).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START = REPO / "slurm" / "cluster" / "start.sh"
STOP = REPO / "slurm" / "cluster" / "stop.sh"
DEFAULT_DIR = "/tmp/hhdpo-slurm"
STARTED_BY = "pytest"
# sacct/scontrol states after which a job never runs again (REQUEUED, PENDING, ... are not final)
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})


@dataclass
class SlurmCluster:
    """The running cluster: ``env`` is os.environ plus SLURM_CONF (pass it to subprocesses)."""

    dir: Path
    env: dict[str, str]
    accounting: bool
    started_here: bool = False
    _lock: object = field(default=None, repr=False)

    @property
    def conf(self) -> str:
        return self.env["SLURM_CONF"]

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    def run(self, *args, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a command (sbatch, scontrol, ...) against this cluster; text output captured."""
        kw.setdefault("env", self.env)
        p = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, timeout=timeout,
                           **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return p

    def sbatch(self, *args, cwd=None) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job_info(self, job_id) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, NodeList, ...); {} once slurmctld purged it."""
        p = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if p.returncode != 0:
            return {}
        info = {}
        for tok in p.stdout.split():
            key, sep, value = tok.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def sacct(self, job_id, fields=("JobID", "State", "ExitCode", "NodeList"), *, steps: bool = False,
              duplicates: bool = False) -> list[dict[str, str]]:
        """sacct's rows for the job (only the allocation's unless ``steps``; every attempt with
        ``duplicates``). State keeps sacct's text, e.g. "CANCELLED by 0"."""
        args = ["sacct", "-j", str(job_id), "-n", "-P", "-o", ",".join(fields)]
        if not steps:
            args.append("-X")
        if duplicates:
            args.append("--duplicates")
        out = self.run(*args).stdout
        return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]

    def job_state(self, job_id) -> str | None:
        """The job's current state, first word only: from sacct when accounting is on (what submitit
        sees), else from scontrol; None when neither knows the job (yet)."""
        if self.accounting:
            rows = self.sacct(job_id, ("JobID", "State"))
            rows = [r for r in rows if r["JobID"] == str(job_id)]
            return rows[-1]["State"].split()[0] if rows else None
        state = self.job_info(job_id).get("JobState")
        return state or None

    def wait_job(self, job_id, timeout: float = 120, poll: float = 0.25) -> str:
        """Wait until the job reaches a final state (after any requeues) and return it, e.g.
        "COMPLETED", "FAILED", "CANCELLED"; raises TimeoutError with the job's details."""
        end = time.monotonic() + timeout
        state = None
        while time.monotonic() < end:
            state = self.job_state(job_id)
            if state in FINAL_STATES:
                return state
            time.sleep(poll)
        info = self.job_info(job_id)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s (state {state}; "
                           f"scontrol: {info or 'gone'})\n{self.log_tail()}")

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition", poll: float = 0.2):
        """Poll ``predicate()`` until it returns something truthy, which is returned."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"{what}: not reached in {timeout} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"):
            p = self.log_dir / name
            if p.is_file():
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {p}\n" + "\n".join(tail))
        return "\n".join(out)


def _parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export "):].partition("=")
            env[key] = value
    return env


def _read_started_by(d: Path) -> str:
    try:
        return (d / "started").read_text().strip()
    except FileNotFoundError:
        return ""


def start_cluster(d: Path | str | None = None, timeout: float = 300) -> SlurmCluster:
    """Start (or join) the cluster in ``d`` and hold a shared lock on it; see :func:`release_cluster`."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests need root: slurm/cluster/start.sh starts munged, slurmctld and slurmd "
                    "(run `make test` as root)")
    missing = [c for c in ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "sbatch", "sacct")
               if shutil.which(c) is None]
    if missing:
        pytest.fail(f"SLURM is not installed (no {', '.join(missing)}): run `slurm/cluster/start.sh --install` "
                    "as root (`make test` does, where it runs as root on Debian/Ubuntu)")
    d = Path(d or os.environ.get("HHDPO_SLURM_DIR") or DEFAULT_DIR)
    d.mkdir(parents=True, exist_ok=True)
    lock = open(d / "users.lock", "a")  # noqa: SIM115 - held for the whole session
    fcntl.flock(lock, fcntl.LOCK_SH)
    try:
        env = dict(os.environ, HHDPO_SLURM_STARTED_BY=STARTED_BY)
        p = subprocess.run(["bash", str(START), str(d)], check=False, capture_output=True, text=True, env=env,
                           timeout=timeout)
        if p.returncode != 0:
            pytest.fail(f"{START} {d} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        exports = _parse_exports(p.stdout)
        if "SLURM_CONF" not in exports:
            pytest.fail(f"{START} printed no SLURM_CONF:\n{p.stdout}\n{p.stderr}")
    except BaseException:
        lock.close()
        raise
    env = dict(os.environ, **exports)
    env.pop("HHDPO_SLURM_STARTED_BY", None)
    return SlurmCluster(dir=d, env=env, accounting=(d / "accounting").exists(),
                        started_here="already up" not in p.stderr, _lock=lock)


def release_cluster(cluster: SlurmCluster) -> None:
    """Drop this session's lock; stop the cluster if a test session started it, nobody else uses
    it and HHDPO_SLURM_KEEP is unset."""
    lock = cluster._lock
    if lock is None:
        return
    try:
        if os.environ.get("HHDPO_SLURM_KEEP") or _read_started_by(cluster.dir) != STARTED_BY:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another test session still uses it; the last one out stops it
        subprocess.run(["bash", str(STOP), str(cluster.dir)], check=False, capture_output=True, text=True,
                       timeout=300)
    finally:
        lock.close()
        cluster._lock = None


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM cluster (2 nodes, n1 and n2, partition debug, accounting on)."""
    cluster = start_cluster()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.conf
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        release_cluster(cluster)
