"""Process-group plumbing: join torchrun/srun, or become torchrun.

How a process joins an existing group (torchrun, srun) is :mod:`hhdpo.core.distenv`.
Without one, ``hhdpo train`` re-executes itself under ``torch.distributed.run`` with
``--nproc-per-node`` workers, forwarding SIGTERM/SIGUSR2 (torchrun passes them on to every
worker and waits for the checkpoint) and returns the trainer's own exit status (torchrun
collapses it to 1, so the status the workers wrote to ``run_state.json`` decides: 0, 2 or 42).

The workers all run on this host, so they meet on 127.0.0.1 (the c10d rendezvous on a port the
store picks, ``--local-addr`` for the workers' MASTER_ADDR), never on this host's name: in a
container without a network (``docker run --network=none``, ``apptainer --network none``) that
name may resolve to nothing or to an address that is not up, and torchrun's ``--standalone``
would wait 300 s for it and fail with DistNetworkError.

torchrun runs in a child process through this module's ``__main__`` (``python -m
hhdpo.launch.torchrun TORCHRUN-ARGS``): the same ``torch.distributed.run.main``, except that the
stop signal it ends with (after its workers saved their checkpoint and exited) is no traceback
of ``SignalException`` but a quiet exit, so that a preemption ends with the trainer's own lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from hhdpo.core.distenv import STATE_REPORTED_BY_LAUNCHER, held_signal, threads_per_process
from hhdpo.core.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2)


def torchrun_options() -> set[str]:
    """The options this torch's torchrun accepts (``--signals-to-handle`` and
    ``--shutdown-timeout`` are recent: torch 2.11's has the first, not the second)."""
    from torch.distributed.run import get_args_parser

    return {o for a in get_args_parser()._actions for o in a.option_strings}


def run_under_torchrun(module: str, argv: list[str], nproc: int, state_file: Path | None,
                       shutdown_timeout: int = 900) -> int:
    """Run ``python -m module argv`` as ``nproc`` torchrun workers on this node."""
    # torchrun forwards only SIGTERM/INT/HUP/QUIT by default, and SIGKILLs workers 30 s after one:
    # let SIGUSR2 through too, and give the workers time to finish a step and save a checkpoint
    opts = torchrun_options()
    cmd = [sys.executable, "-m", "hhdpo.launch.torchrun", *local_rendezvous(), f"--nproc-per-node={nproc}"]
    usr2_as = signal.SIGUSR2
    if "--signals-to-handle" in opts:
        cmd.append(f"--signals-to-handle={','.join(s.name for s in FORWARDED_SIGNALS)}")
    else:  # an older torchrun would die on SIGUSR2: hand it SIGTERM, which the trainer treats the same way
        usr2_as = signal.SIGTERM
    if "--shutdown-timeout" in opts:
        cmd.append(f"--shutdown-timeout={shutdown_timeout}")
    else:
        print("hhdpo train: this torch's torchrun has no --shutdown-timeout: after a stop signal the workers get "
              "30 s to save their checkpoint before torchrun kills them", file=sys.stderr, flush=True)
    cmd += ["-m", module, *argv]
    if held_signal():  # stopped before any worker started: nothing to save, the run resumes as it is
        print(f"hhdpo train: {signal.Signals(held_signal()).name} before the workers started; exiting "
              f"{EXIT_PREEMPTED} (requeue to run)", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    started = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=threads_per_process(nproc),
               **{STATE_REPORTED_BY_LAUNCHER: "1"}, **({_STATE_ENV: f"{state_file}@{started}"} if state_file else {}))
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        proc.send_signal(usr2_as if signum == signal.SIGUSR2 else signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
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


def local_rendezvous() -> list[str]:
    """torchrun options for workers that all run on this host: a c10d rendezvous on 127.0.0.1
    (port 0: the store binds a free one; the workers reuse the agent's store), and 127.0.0.1 as
    the workers' MASTER_ADDR (``--local-addr``; else torchrun publishes ``socket.getfqdn()``).
    What ``--standalone`` does, without resolving this host's name."""
    return ["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4()}",
            "--local-addr=127.0.0.1"]


# run_under_torchrun -> torchrun_main: "<run_state.json>@<launch time>"
_STATE_ENV = "HHDPO_LAUNCH_RUN_STATE"


def _completed_in_this_launch() -> bool:
    path, _, started = os.environ.get(_STATE_ENV, "").rpartition("@")
    try:
        state = Path(path)
        return bool(path) and state.stat().st_mtime >= float(started) and json.loads(state.read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def torchrun_main(argv: list[str]) -> int:
    """``torch.distributed.run.main(argv)``; a stop signal that ended it (torchrun raises
    ``SignalException`` once its workers are gone, printed as a 28-line traceback) is a quiet
    ``128 + signal`` instead, and so is a worker that died after the run completed (gloo's
    teardown without a network has aborted a rank at exit: the run and its files are whole).
    Everything else (a failed worker's error table, bad options) as torchrun."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        if not _completed_in_this_launch():
            raise
        ranks = ", ".join(f"rank {f.local_rank} (exit {f.exitcode})" for f in e.failures.values())
        print(f"hhdpo train: warning: {ranks} ended abnormally after the run completed, while exiting; "
              "the run and its files are complete", file=sys.stderr, flush=True)
    return 0


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without option ``--name`` (both spellings, ``--x v`` and ``--x=v``): what the
    launcher handles itself is not passed on to the workers."""
    forms = {f"--{name}", f"--{name.replace('_', '-')}"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in forms:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in forms)):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
