"""``hhdpo submit`` and its Python API: the stages as submitit jobs, chained by SLURM dependencies.

    hhdpo submit train    --config configs/smollm2_cpu.yaml slurm.nodes=2 [key=value ...]
    hhdpo submit eval     --config runs/smollm2-dpo/model/config.yaml
    hhdpo submit pipeline --config configs/smollm2_cpu.yaml [--wait]
    hhdpo submit sweep    --config configs/smollm2_cpu.yaml dpo_training.dpo_beta=0.01,0.1,0.5
    hhdpo submit train    --config cfg.yaml --dry-run        # print the sbatch file, submit nothing

    from hhdpo.config import load_config
    from hhdpo.submit import submit_pipeline
    jobs = submit_pipeline(load_config("configs/smollm2_cpu.yaml", ["slurm.partition=gpu"]))
    summary = jobs[-1].result()       # train -> generate -> judge; the judge job returns the summary

Resources come from the config's ``slurm`` section (``slurm.key=value`` overrides it); keyword
arguments of the ``submit_*`` functions go to ``executor.update_parameters`` last and win.
``slurm.cluster: local`` runs the same jobs as processes on this machine (one after the
other), ``debug`` in this process. Jobs run the stages' own entry points (hhdpo.submit_jobs);
the completion markers, the checks before each stage and the run directory are those of
``slurm/pipeline.sh`` (hhdpo.slurm), so either can continue the other's run. Container mode:
``HHDPO_SIF=img.sif`` runs each job's python under ``apptainer exec --nv``, ``HHDPO_IMAGE=img``
under pyxis (``srun --container-image``), with the binds of ``slurm/common.sh``.
Exit codes: 0 submitted (with --wait: completed), 2 bad config, 1 a job failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

import submitit

from hhdpo import slurm as hs
from hhdpo.config import Config, ConfigError, config_yaml, run_paths
from hhdpo.errors import EXIT_UNEXPECTED
from hhdpo.io import atomic_write_text
from hhdpo.submit_jobs import GenerateJob, JudgeJob, TrainJob

REPO = Path(__file__).resolve().parents[1]


def absolute(cfg: Config) -> Config:
    """``cfg`` with run_dir absolute: jobs find the run whatever their working directory."""
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir or ".").expanduser().resolve()))


def write_job_config(cfg: Config, name: str) -> Path:
    """The config the jobs load (secrets redacted, run_dir absolute), under the run's slurm dir."""
    path = hs.slurm_dir(cfg) / "submit" / f"{name}.yaml"
    atomic_write_text(path, config_yaml(cfg))
    return path


def container_binds() -> list[str]:
    """slurm/common.sh's binds (SRC:DST[:ro], each at the same path inside): this checkout read-only
    unless the working directory holds it, the working directory (run_dir and data relative to
    it), HF_HOME, and HHDPO_BINDS (comma-separated SRC[:DST[:ro]], absolute paths)."""
    wd, repo = os.getcwd(), str(REPO)
    binds = [] if repo == wd or repo.startswith(wd + "/") else [f"{repo}:{repo}:ro"]
    binds.append(f"{wd}:{wd}")
    if os.environ.get("HF_HOME"):
        binds.append(f"{os.environ['HF_HOME']}:{os.environ['HF_HOME']}")
    for entry in filter(None, os.environ.get("HHDPO_BINDS", "").split(",")):
        src, dst, opt = (entry.split(":") + ["", ""])[:3]
        if not src.startswith("/") or (dst and not dst.startswith("/")) or opt not in ("", "ro", "rw"):
            raise ConfigError(f"HHDPO_BINDS: bad entry {entry!r}: SRC[:DST[:ro]] with absolute paths, comma-separated")
        binds.append(f"{src}:{dst or src}" + (f":{opt}" if opt else ""))
    return binds


def container_options() -> dict:
    """AutoExecutor options for HHDPO_SIF (apptainer) or HHDPO_IMAGE (pyxis); {} bare-metal. The
    host environment reaches the container (keys included, never on a command line); HF_HOME is
    passed explicitly because the image sets its own."""
    sif, image = os.environ.get("HHDPO_SIF"), os.environ.get("HHDPO_IMAGE")
    if sif and image:
        raise ConfigError("HHDPO_SIF and HHDPO_IMAGE are both set: choose apptainer (HHDPO_SIF) or pyxis (HHDPO_IMAGE)")
    if not sif and not image:
        return {}
    binds, hf = ",".join(container_binds()), os.environ.get("HF_HOME")
    if sif:
        if not Path(sif).is_file():
            raise ConfigError(f"HHDPO_SIF={sif}: no such image file")
        app = ["apptainer", "exec", "--nv", "--bind", binds, "--pwd", os.getcwd()]
        app += ["--env", f"HF_HOME={hf}"] if hf else []
        return {"slurm_python": shlex.join([*app, str(Path(sif).resolve()), "python"])}
    srun = [f"--container-image={image}", f"--container-mounts={binds}", f"--container-workdir={os.getcwd()}"]
    srun += ["--container-env=HF_HOME"] if hf else []
    return {"slurm_python": "python", "slurm_srun_args": srun}


def local_judge(cfg: Config) -> bool:
    """The judge is a vLLM server started by the judge job (no OpenAI key, no base_url): it needs GPUs."""
    return not cfg.judge.base_url and not os.environ.get("OPENAI_API_KEY")


def make_executor(cfg: Config, stage: str, *, nodes: int = 1, tasks_per_node: int = 1, gpus: int = 0,
                  depends_on=(), **options) -> submitit.AutoExecutor:
    """A submitit executor for one stage of ``cfg``; ``depends_on``: jobs (or ids) that must end OK first."""
    s = cfg.slurm
    container = container_options()
    kw = {k: v for k, v in container.items() if k == "slurm_python"}
    ex = submitit.AutoExecutor(folder=run_paths(cfg).run / s.folder / "%j", cluster=s.cluster,
                               slurm_max_num_timeout=s.max_num_timeout, **kw)
    extra = {k: True if v in ("", None) else v for k, v in s.extra.items()}  # "" = a flag: --exclusive
    ids = [str(getattr(j, "job_id", j)) for j in depends_on]
    if ids and s.cluster == "slurm":
        extra.update({"dependency": "afterok:" + ":".join(ids), "kill-on-invalid-dep": "yes"})
    params = {"name": f"hhdpo-{stage}", "timeout_min": s.time, "nodes": nodes, "tasks_per_node": tasks_per_node,
              "slurm_signal_delay_s": s.signal_delay, "slurm_additional_parameters": extra,
              "slurm_array_parallelism": s.array_parallelism}
    if gpus:
        params["gpus_per_node"] = gpus
    if s.cpus_per_task:
        params["cpus_per_task"] = s.cpus_per_task
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(s, key) is not None:
            params[f"slurm_{key}"] = getattr(s, key)
    if "slurm_srun_args" in container:
        params["slurm_srun_args"] = container["slurm_srun_args"]
    ex.update_parameters(**params)
    if options:
        ex.update_parameters(**options)
    return ex


def job_result(job):
    """What rank 0 of ``job`` returned (``job.result()`` refuses jobs of several tasks); raises
    submitit's FailedJobError with the job's own error if it failed."""
    return job.results()[0]


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


def check_run_dir(cfg: Config, stages: list[str]) -> None:
    """slurm/pipeline.sh's checks (hhdpo.slurm.check_run_dir); locally no job can be in flight."""
    hs.check_run_dir(cfg, stages, in_flight=cfg.slurm.cluster == "slurm")


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
    from hhdpo.stage import StageParser, load_stage_config, run_stage

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
            from hhdpo.sweep import sweep_cli

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
    from hhdpo.summarize import markdown

    return markdown(summary)


if __name__ == "__main__":
    sys.exit(cli())
