"""submitit executors for hhdpo's jobs: resources from the config's ``slurm`` section, container
mode (``HHDPO_SIF``/``HHDPO_IMAGE``), job configs written into the run directory, and the checks
before a stage. Used by :mod:`hhdpo.submit` and :mod:`hhdpo.launch.sweep`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import submitit

from hhdpo.core.config import Config, ConfigError, config_yaml, run_paths
from hhdpo.core.io import atomic_write_text
from hhdpo.launch import slurm as hs
from hhdpo.launch.slurm import REPO


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
    it), HF_HOME, HHDPO_CACHE, and HHDPO_BINDS (comma-separated SRC[:DST[:ro]], absolute paths)."""
    wd, repo = os.getcwd(), str(REPO)
    binds = [] if repo == wd or repo.startswith(wd + "/") else [f"{repo}:{repo}:ro"]
    binds.append(f"{wd}:{wd}")
    if os.environ.get("HF_HOME"):
        binds.append(f"{os.environ['HF_HOME']}:{os.environ['HF_HOME']}")
    if os.environ.get("HHDPO_CACHE"):
        binds.append(f"{os.environ['HHDPO_CACHE']}:{os.environ['HHDPO_CACHE']}")
    for entry in filter(None, os.environ.get("HHDPO_BINDS", "").split(",")):
        src, dst, opt = (entry.split(":") + ["", ""])[:3]
        if not src.startswith("/") or (dst and not dst.startswith("/")) or opt not in ("", "ro", "rw"):
            raise ConfigError(f"HHDPO_BINDS: bad entry {entry!r}: SRC[:DST[:ro]] with absolute paths, comma-separated")
        binds.append(f"{src}:{dst or src}" + (f":{opt}" if opt else ""))
    return binds


def container_options() -> dict:
    """AutoExecutor options for HHDPO_SIF (apptainer) or HHDPO_IMAGE (pyxis); {} bare-metal. The
    host environment reaches the container (keys included, never on a command line); HF_HOME and
    HHDPO_CACHE are passed explicitly because the image sets its own. HHDPO_CACHE is the host's, or
    .cache/hhdpo in the working directory: an Apptainer image is read-only, and the reference
    log-probs cached there outlive the job (the job creates it and exports it: ``slurm_setup``)."""
    sif, image = os.environ.get("HHDPO_SIF"), os.environ.get("HHDPO_IMAGE")
    if sif and image:
        raise ConfigError("HHDPO_SIF and HHDPO_IMAGE are both set: choose apptainer (HHDPO_SIF) or pyxis (HHDPO_IMAGE)")
    if not sif and not image:
        return {}
    binds, hf = ",".join(container_binds()), os.environ.get("HF_HOME")
    cache = os.environ.get("HHDPO_CACHE") or os.path.join(os.getcwd(), ".cache", "hhdpo")
    setup = [f"mkdir -p {shlex.quote(cache)}", f"export HHDPO_CACHE={shlex.quote(cache)}"]
    if sif:
        if not Path(sif).is_file():
            raise ConfigError(f"HHDPO_SIF={sif}: no such image file")
        app = ["apptainer", "exec", "--nv", "--bind", binds, "--pwd", os.getcwd()]
        app += ["--env", f"HF_HOME={hf}"] if hf else []
        app += ["--env", f"HHDPO_CACHE={cache}"]
        return {"slurm_python": shlex.join([*app, str(Path(sif).resolve()), "python"]), "slurm_setup": setup}
    srun = [f"--container-image={image}", f"--container-mounts={binds}", f"--container-workdir={os.getcwd()}",
            "--container-env=" + ",".join(["HF_HOME"] * bool(hf) + ["HHDPO_CACHE"])]
    return {"slurm_python": "python", "slurm_srun_args": srun, "slurm_setup": setup}


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
    srun = list(container.get("slurm_srun_args", []))
    if nodes * tasks_per_node > 1:
        srun.append("--kill-on-bad-exit=1")  # a failed rank ends the step: the others would wait in a collective
    if srun:
        params["slurm_srun_args"] = srun
    if "slurm_setup" in container:
        params["slurm_setup"] = container["slurm_setup"]
    ex.update_parameters(**params)
    if options:
        ex.update_parameters(**options)
    return ex


def job_result(job):
    """What rank 0 of ``job`` returned (``job.result()`` refuses jobs of several tasks); raises
    submitit's FailedJobError with the job's own error if it failed."""
    return job.results()[0]


def check_run_dir(cfg: Config, stages: list[str]) -> None:
    """slurm/pipeline.sh's checks (hhdpo.launch.slurm.check_run_dir); locally no job can be in flight."""
    hs.check_run_dir(cfg, stages, in_flight=cfg.slurm.cluster == "slurm")
