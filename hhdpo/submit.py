"""``hhdpo submit`` and its Python API: the stages as submitit jobs, chained by SLURM dependencies.

    hhdpo submit train    --config configs/smollm2_cpu.yaml slurm.nodes=2 [key=value ...]
    hhdpo submit eval     --config runs/smollm2-dpo/model/config.yaml
    hhdpo submit pipeline --config configs/smollm2_cpu.yaml [--wait]
    hhdpo submit sweep    --config configs/smollm2_cpu.yaml dpo_training.dpo_beta=0.01,0.1,0.5
    hhdpo submit train    --config cfg.yaml --dry-run        # print the sbatch file, submit nothing

    from hhdpo.core.config import load_config
    from hhdpo.submit import submit_pipeline
    jobs = submit_pipeline(load_config("configs/smollm2_cpu.yaml", ["slurm.partition=gpu"]))
    summary = jobs[-1].result()       # train -> generate -> judge; the judge job returns the summary

Resources come from the config's ``slurm`` section (``slurm.key=value`` overrides it); keyword
arguments of the ``submit_*`` functions go to ``executor.update_parameters`` last and win.
``slurm.cluster: local`` runs the same jobs as processes on this machine (one after the
other), ``debug`` in this process. Jobs run the stages' own entry points (hhdpo.launch.jobs);
the completion markers, the checks before each stage and the run directory are those of
``slurm/pipeline.sh`` (hhdpo.launch.slurm), so either can continue the other's run. Container mode:
``HHDPO_SIF=img.sif`` runs each job's python under ``apptainer exec --nv``, ``HHDPO_IMAGE=img``
under pyxis (``srun --container-image``), with the binds of ``slurm/common.sh``.
Exit codes: 0 submitted (with --wait: completed), 2 bad config, 1 a job failed.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from hhdpo.core.config import Config, ConfigError, run_paths
from hhdpo.core.errors import EXIT_UNEXPECTED
from hhdpo.launch import slurm as hs
from hhdpo.launch.executor import (  # noqa: F401
    absolute,
    check_run_dir,
    container_binds,
    container_options,
    job_result,
    local_judge,
    make_executor,
    write_job_config,
)
from hhdpo.launch.jobs import GenerateJob, JudgeJob, TrainJob


def submit_train(cfg: Config, depends_on=(), **options):
    """Training on ``slurm.nodes`` x ``slurm.ranks_per_node`` ranks; ``job_result(job)`` (rank 0's) ->
    {save_dir, state}."""
    cfg = absolute(cfg)
    s = cfg.slurm
    ex = make_executor(cfg, "train", nodes=s.nodes, tasks_per_node=s.ranks_per_node, gpus=s.gpus_per_node,
                       depends_on=depends_on, **options)
    return ex.submit(TrainJob(), str(write_job_config(cfg, "train")))


def submit_generate(cfg: Config, models: list[str] | None = None, depends_on=(), **options):
    """Generation for ``models`` (default policy, base) on one node with ``slurm.gpus_per_node`` GPUs."""
    cfg = absolute(cfg)
    ex = make_executor(cfg, "generate", gpus=cfg.slurm.gpus_per_node, depends_on=depends_on, **options)
    return ex.submit(GenerateJob(), str(write_job_config(cfg, "generate")), models or ["policy", "base"])


def submit_judge(cfg: Config, models: list[str] | None = None, depends_on=(), **options):
    """pairwise, judge, summarize and the report for ``models``; ``job.result()`` is the summary dict."""
    cfg = absolute(cfg)
    ex = make_executor(cfg, "judge", gpus=cfg.slurm.gpus_per_node if local_judge(cfg) else 0, depends_on=depends_on,
                       **options)
    return ex.submit(JudgeJob(), str(write_job_config(cfg, "judge")), models or ["policy", "base"])


SUBMIT = {"train": submit_train, "generate": submit_generate, "judge": submit_judge}


def submit_chain(cfg: Config, stages: list[str], **options) -> list:
    """Submit ``stages`` in order, each after the previous one (afterok); returns the jobs."""
    cfg = absolute(cfg)
    check_run_dir(cfg, stages)
    jobs, prev = [], None
    for stage in stages:
        job = SUBMIT[stage](cfg, depends_on=[prev] if prev else [], **options)
        jobs.append(job)
        if cfg.slurm.cluster == "slurm":
            hs.record_jobs(cfg, {s: j.job_id for s, j in zip(stages, jobs)})
        elif stage != stages[-1]:
            job_result(job)  # no SLURM dependencies locally: the next stage starts once this one is done
        prev = job
    return jobs


def submit_pipeline(cfg: Config, **options) -> list:
    """train -> generate -> judge; stages already complete with this config are skipped (their
    markers), as by slurm/pipeline.sh. ``jobs[-1].result()`` is the summary; [] if all complete."""
    return submit_chain(cfg, hs.plan(absolute(cfg))[1], **options)


def submit_eval(cfg: Config, **options) -> list:
    """generate -> judge for a trained run (its saved config.yaml): the pipeline without training."""
    return submit_chain(cfg, ["generate", "judge"], **options)


def render_sbatch(cfg: Config, stage: str) -> str:
    """The sbatch file submitit would submit for ``stage`` (train, generate, judge): for --dry-run."""
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = absolute(cfg)
    s = cfg.slurm
    shape = {"train": {"nodes": s.nodes, "tasks_per_node": s.ranks_per_node, "gpus": s.gpus_per_node},
             "generate": {"gpus": s.gpus_per_node},
             "judge": {"gpus": s.gpus_per_node if local_judge(cfg) else 0}}[stage]
    ex = make_executor(dataclasses.replace(cfg, slurm=dataclasses.replace(s, cluster="slurm")), stage, **shape)
    inner = ex._executor
    return _make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder, **inner.parameters)


# --------------------------------------------------------------------------- CLI


def _print_jobs(jobs, cfg: Config, names: list[str]) -> None:
    for name, job in zip(names, jobs):
        print(f"{name}: job {job.job_id}  (log {job.paths.stdout})")
    print(f"run_dir: {run_paths(absolute(cfg)).run}")


def cli(argv: list[str] | None = None) -> int:
    from hhdpo.core.stage import StageParser, load_stage_config, run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = ("train", "eval", "pipeline", "sweep")
    kind = argv[0] if argv and argv[0] in kinds else None
    ap = StageParser(f"hhdpo submit {kind or '{' + ','.join(kinds) + '}'}", __doc__,
                     config_help="YAML config (resources in its slurm section)")
    ap.flag("wait", action="store_true", help="wait for the last job and print its result (always so locally)")
    ap.flag("dry_run", action="store_true", help="print the sbatch file of each job; submit nothing")

    if kind is None and argv[:1] in (["-h"], ["--help"]):
        ap.parse(argv)  # prints the help and exits 0, as every stage's --help does

    def body() -> int:
        if kind is None:
            raise ConfigError(f"hhdpo submit: expected one of {', '.join(kinds)} first, got {argv[:1]}")
        args = ap.parse(argv[1:])
        if kind == "sweep":
            from hhdpo.launch.sweep import sweep_cli

            return sweep_cli(args)
        cfg = load_stage_config(args)
        stages = {"train": ["train"], "eval": ["generate", "judge"], "pipeline": hs.plan(absolute(cfg))[1]}[kind]
        if args.dry_run:
            for stage in stages:
                print(f"# ---- {stage}\n{render_sbatch(cfg, stage)}")
            return 0
        if not stages:
            print(f"every stage is complete; nothing submitted\nrun_dir: {run_paths(absolute(cfg)).run}")
            return 0
        jobs = submit_chain(cfg, stages)
        _print_jobs(jobs, cfg, stages)
        if args.wait or cfg.slurm.cluster != "slurm":
            result = job_result(jobs[-1])
            print(json.dumps(result, indent=1, default=str) if stages[-1] == "train" else _table(result))
        return 0

    def checked() -> int:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return body()
        except (FailedJobError, UncompletedJobError) as e:  # the job's own error, not a traceback of ours
            print(f"hhdpo submit {kind}: a job failed:\n{e}", file=sys.stderr)
            return EXIT_UNEXPECTED

    return run_stage(f"hhdpo submit {kind or ''}".strip(), checked)


def _table(summary: dict) -> str:
    from hhdpo.evaluation.summarize import markdown

    return markdown(summary)


if __name__ == "__main__":
    sys.exit(cli())
