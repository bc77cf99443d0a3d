"""What ``hhdpo submit`` jobs run: the stages' own entry points (``hhdpo.<stage>.cli``, the same
arguments and exit codes as the command line), inside a submitit job on SLURM or on this machine.

Preemption (the design; submitit's USR2 handler cannot host FSDP's collective save):
submitit installs its handler for USR2 (``--signal=USR2@<slurm.signal_delay>``, no ``B:``, so
slurmstepd signals every rank) before the job function runs. :class:`TrainJob` keeps that handler
and lets the trainer install its own: on USR2 or SIGTERM every rank finishes its step, the ranks
agree on the step (an all-reduced flag), save one DCP checkpoint together, write run_state.json and
``hhdpo train`` returns 42. Only then does rank 0 call submitit's handler, outside any signal
context: it calls :meth:`TrainJob.checkpoint` (a ``DelayedSubmission`` of the same call, which
``checkpoint.resume: auto`` continues), counts a timeout against ``slurm.max_num_timeout``
(preemptions are not counted), runs ``scontrol requeue`` and exits. The other ranks exit without a
result file, so nothing stale is read after the requeue. Generation and judging resume from
their own outputs, so submitit's handler simply requeues them.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys

import submitit

from hhdpo.core.config import load_config, run_paths
from hhdpo.core.distenv import threads_per_process
from hhdpo.core.errors import EXIT_INCOMPLETE, EXIT_OK, EXIT_PREEMPTED, exit_meaning
from hhdpo.core.stage import STAGES

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class StageFailed(RuntimeError):
    """A stage run by a job exited non-zero (its own message is in the job's log above)."""

    exit_code = None


class JudgeIncomplete(StageFailed):
    """The judge left pairs without a verdict (budget) or with judge_error: the summary was written,
    labelled PARTIAL, and no completion marker; resubmit to finish (``hhdpo judge``'s exit 75)."""

    exit_code = EXIT_INCOMPLETE


def run_stage_cli(stage: str, argv: list[str]) -> None:
    """``hhdpo <stage> argv`` in this process; raises StageFailed unless it exits 0."""
    check_exit(stage, argv, importlib.import_module(STAGES[stage][0]).cli(argv))


def check_exit(stage: str, argv: list[str], rc: int) -> None:
    if rc != EXIT_OK:
        raise StageFailed(f"hhdpo {stage} {' '.join(argv)} exited {rc} ({exit_meaning(rc)}); its message is in "
                          "the job's log above")


def _threads(tasks_per_node: int) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = os.environ.get("SLURM_CPUS_PER_TASK") or threads_per_process(tasks_per_node)


def export_torch_env() -> tuple[int, dict]:
    """RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address of this task (submitit's
    ``TorchDistributedEnvironment``), the port from the job id as ``hhdpo.core.distenv`` picks it.
    Returns (rank, the variables' previous values) so that an in-process (debug) job can restore them."""
    from hhdpo.core.distenv import node_addr, rendezvous_port

    saved = {k: os.environ.get(k) for k in DIST_VARS}
    env = submitit.JobEnvironment()
    job = "".join(ch for ch in os.environ.get("SLURM_JOB_ID", str(env.job_id)) if ch.isdigit()) or "0"
    os.environ["MASTER_PORT"] = str(rendezvous_port(int(job)))
    dist = submitit.helpers.TorchDistributedEnvironment()
    if env.num_nodes == 1:
        dist.master_addr = "127.0.0.1"  # one node: no name to resolve
    else:  # the first node's NodeAddr: its NodeName may resolve only through a test cluster's /etc/hosts
        dist.master_addr = node_addr(dist.master_addr)
    dist.export(set_cuda_visible_devices=False, overwrite=True)
    _threads(env.num_tasks // max(1, env.num_nodes))
    return env.global_rank, saved


def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _is_submitit_handler(h) -> bool:
    return type(getattr(h, "__self__", None)).__name__ == "SignalHandler"


class TrainJob(submitit.helpers.Checkpointable):
    """``hhdpo train --config FILE`` on every rank of the job (see the module docstring)."""

    def __call__(self, config_file: str) -> dict:
        from hhdpo.launch import slurm as hs

        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + requeue, on rank 0
        rank, saved = export_torch_env()
        try:
            cfg = load_config(config_file)
            if rank == 0:
                hs.job_start("train", cfg, None)  # this stage's and later stages' markers go
            print(f"[submit] train: job {os.environ.get('SLURM_JOB_ID', 'local')} attempt "
                  f"{os.environ.get('SLURM_RESTART_COUNT', '0')} rank {rank} of {os.environ['WORLD_SIZE']} on "
                  f"{os.environ.get('SLURMD_NODENAME', 'localhost')}", flush=True)
            rc = importlib.import_module(STAGES["train"][0]).cli(["--config", config_file])
        finally:
            _restore(saved)
        if rc == EXIT_PREEMPTED:
            if rank == 0 and _is_submitit_handler(requeue):
                print("[submit] checkpoint saved by every rank; requeueing through submitit", flush=True)
                requeue(signal.SIGUSR2, None)  # calls self.checkpoint(), scontrol requeue, exits
            sys.exit(EXIT_OK if rank else EXIT_PREEMPTED)  # SystemExit: submitit writes no result file
        check_exit("train", ["--config", config_file], rc)
        paths = run_paths(cfg)
        if rank == 0:
            hs.write_marker(cfg, "train")
        return {"stage": "train", "rank": rank, "save_dir": str(paths.save.resolve()),
                "state": json.loads(paths.state.read_text()) if paths.state.is_file() else None}


class GenerateJob(submitit.helpers.Checkpointable):
    """``hhdpo generate --config FILE --models NAMES`` (tensor parallel over the job's GPUs)."""

    def __call__(self, config_file: str, models: list[str], marker: bool = True) -> dict:
        from hhdpo.launch import slurm as hs

        cfg = load_config(config_file)
        if marker:
            hs.job_start("generate", cfg, models)
        gpus = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0)
        tp = [f"vllm.tensor_parallel_size={gpus}"] if gpus > 0 else []
        run_stage_cli("generate", ["--config", config_file, "--models", ",".join(models), *tp])
        if marker:
            hs.write_marker(cfg, "generate", models)
        paths = run_paths(cfg)
        return {"stage": "generate", "files": {m: str(paths.gen_out(m).resolve()) for m in models}}


class JudgeJob(submitit.helpers.Checkpointable):
    """pairwise -> judge -> summarize (-> report) for ``models``; returns the summary dict, or
    raises :class:`JudgeIncomplete` (after writing the PARTIAL summary, with no marker) when the
    judge stopped on its budget or left verdicts with judge_error: the job fails, a rerun finishes."""

    def __call__(self, config_file: str, models: list[str], marker: bool = True) -> dict:
        from hhdpo.evaluation.report import write_report_or_warn
        from hhdpo.launch import slurm as hs

        cfg = load_config(config_file)
        if marker:
            hs.job_start("judge", cfg, models)
        argv = ["--config", config_file, "--models", ",".join(models)]
        run_stage_cli("pairwise", argv)
        rc = importlib.import_module(STAGES["judge"][0]).cli(argv)
        if rc != EXIT_INCOMPLETE:
            check_exit("judge", argv, rc)
        run_stage_cli("summarize", argv)  # a partial summary too: it says PARTIAL and counts what is left
        write_report_or_warn(cfg)
        why = hs.judge_incomplete(cfg, models)
        if rc == EXIT_INCOMPLETE or why:
            raise JudgeIncomplete(f"hhdpo judge {' '.join(argv)} is incomplete (exit {EXIT_INCOMPLETE}: "
                                  f"{exit_meaning(EXIT_INCOMPLETE)}): {why or 'see the log above'}; the summary is "
                                  "PARTIAL and no completion marker was written; resubmit to judge the rest")
        if marker:
            hs.write_marker(cfg, "judge", models)
        return json.loads((run_paths(cfg).eval / "summary.json").read_text())
