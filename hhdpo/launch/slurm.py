"""The Python side of ``slurm/``: stage completion markers, the checks before a submission, the
pipeline's sbatch commands, and the requeue decision's command (hhdpo.launch.requeue). The sbatch
scripts and ``hhdpo submit`` call it; nothing here imports torch.

    slurm/pipeline.sh CONFIG [key=value ...] [--dry-run]     = python -m hhdpo.launch.slurm pipeline ...
    python -m hhdpo.launch.slurm job-start STAGE --config FILE [key=value ...]   (inside a job: paths, checks)
    python -m hhdpo.launch.slurm job-done STAGE --config FILE [key=value ...]    (inside a job: the marker;
        judge: exits 75 and writes none while a pair has no verdict or a judge_error)
    python -m hhdpo.launch.slurm requeue-decision RUN_DIR      (train job, step exited 42: 0 requeue, 3 not)

Stages run in the order train -> generate -> judge (pairwise, judge, summarize). A stage that
finishes writes ``<run_dir>/slurm/done/<stage>.json`` with its config hash: the hash of the keys
its outputs depend on, its upstream stages' keys included, so a changed training key invalidates
every later marker too. A marker with another hash does not count; a stage that starts removes
its own marker and the later ones (their inputs are about to change).

Every job of a run logs to ``<run_dir>/slurm/logs/``: the sbatch ``-o`` file of the job
(``%x-%j.out``, all attempts appended) and one ``<stage>-<job>-attempt<N>.log`` per attempt
(N = SLURM_RESTART_COUNT), which a requeue does not overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from hhdpo.core.config import Config, ConfigError, load_config, redact, run_paths
from hhdpo.core.errors import EXIT_INCOMPLETE, EXIT_OK
from hhdpo.launch.requeue import SIGNAL_SLACK, parse_time_left, requeue_decision, squeue_time_left, stop_reason  # noqa: F401 - part of this module's API (tests, scripts)

STAGES = ("train", "generate", "judge")
SCRIPTS = {"train": "train.sbatch", "generate": "generate.sbatch", "judge": "judge.sbatch"}
# config keys each stage's outputs depend on; a stage's hash also covers its upstream stages' keys.
# Left out: run_dir (where, not what), checkpoint (how often, not what), vllm (engine settings,
# tensor_parallel_size from the allocation), huggingface, wandb.
STAGE_KEYS = {
    "train": ("policy_model", "ref_model", "precision", "device", "trust_remote_code", "dataset", "dpo_training",
              "tail_test"),
    "generate": ("HH_test",),
    "judge": ("judge", "eval"),
}
OPERATIONAL_KEYS = frozenset({"judge.concurrency", "judge.max_retries", "judge.timeout"})
# extra sbatch options per stage, from the environment (partition, GPUs, time, ...)
SBATCH_ENV = {"train": "HHDPO_TRAIN_SBATCH", "generate": "HHDPO_GENERATE_SBATCH", "judge": "HHDPO_JUDGE_SBATCH"}
REPO = Path(__file__).resolve().parents[2]
EXIT_NO_REQUEUE = 3  # requeue-decision: do not requeue (0: requeue)


# --------------------------------------------------------------------------- markers


def slurm_dir(cfg: Config) -> Path:
    return run_paths(cfg).run.resolve() / "slurm"


def marker_path(cfg: Config, stage: str) -> Path:
    return slurm_dir(cfg) / "done" / f"{stage}.json"


def attempt_log(cfg: Config, stage: str, job_id: str, restart: int) -> Path:
    return slurm_dir(cfg) / "logs" / f"{stage}-{job_id}-attempt{restart}.log"


def stage_inputs(cfg: Config, stage: str, models: list[str] | None = None) -> dict:
    """The settings a stage's outputs depend on (its upstream stages' included)."""
    d = cfg.to_dict()
    picked: dict = {}
    for s in STAGES[: STAGES.index(stage) + 1]:
        for key in STAGE_KEYS[s]:
            v = d[key]
            if isinstance(v, dict):
                v = {k: x for k, x in v.items() if f"{key}.{k}" not in OPERATIONAL_KEYS}
            picked[key] = v
    if stage != "train":
        picked["models"] = models or ["policy", "base"]
    if stage == "judge":  # the key picks the judge (OpenAI vs a local one); its value is never recorded
        picked["openai_key_set"] = bool(os.environ.get("OPENAI_API_KEY"))
    return picked


def stage_hash(cfg: Config, stage: str, models: list[str] | None = None) -> str:
    blob = json.dumps(stage_inputs(cfg, stage, models), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_marker(cfg: Config, stage: str) -> dict | None:
    try:
        return json.loads(marker_path(cfg, stage).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(cfg: Config, stage: str, models: list[str] | None = None) -> bool:
    m = read_marker(cfg, stage)
    return m is not None and m.get("config_hash") == stage_hash(cfg, stage, models)


def write_marker(cfg: Config, stage: str, models: list[str] | None = None) -> Path:
    from hhdpo.core.io import atomic_write_json

    path = marker_path(cfg, stage)
    atomic_write_json(path, {"stage": stage, "config_hash": stage_hash(cfg, stage, models),
                             "job_id": os.environ.get("SLURM_JOB_ID"),
                             "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return path


def judge_incomplete(cfg: Config, models: list[str] | None = None) -> str | None:
    """Why the judge stage of ``models`` is not complete, in words; None when every pair of each
    model's pairwise file has a current verdict without judge_error (no marker before that)."""
    from hhdpo.core.io import DataError
    from hhdpo.evaluation.judge_resume import (
        DEFAULT_MODELS,
        describe_coverage,
        file_coverage,
        model_files,
    )

    parts = []
    for pw, judged in zip(*model_files(cfg, models or list(DEFAULT_MODELS))):
        try:
            c = file_coverage(pw, judged)
        except DataError as e:
            parts.append(str(e))
            continue
        if not c["complete"]:
            parts.append(f"{judged}: {describe_coverage(c)}")
    return "; ".join(parts) or None


def clear_markers_from(cfg: Config, stage: str) -> list[str]:
    """Remove the markers of ``stage`` and every later stage; returns the stages cleared."""
    cleared = []
    for s in STAGES[STAGES.index(stage):]:
        p = marker_path(cfg, s)
        if p.exists():
            p.unlink()
            cleared.append(s)
    return cleared


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def trained_with_other_config(cfg: Config) -> list[str]:
    """Training keys that differ between ``cfg`` and the config saved in its save_dir (empty when
    there is none or they agree): resuming there would continue another run's checkpoint."""
    saved = run_paths(cfg).save / "config.yaml"
    if not saved.is_file():
        return []
    try:
        old = load_config(saved)
    except ConfigError as e:
        return [f"{saved} does not load ({e})"]
    return _diff(stage_inputs(old, "train"), stage_inputs(cfg, "train"))


# --------------------------------------------------------------------------- pipeline


def _jobs_file(cfg: Config) -> Path:
    return slurm_dir(cfg) / "jobs.json"  # the job ids of the latest submission


def record_jobs(cfg: Config, ids: dict[str, str]) -> None:
    """Remember a submission's job ids (``jobs_in_flight`` reads them); pipeline.sh and hhdpo submit."""
    path = _jobs_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ids) + "\n")


def jobs_in_flight(cfg: Config) -> list[str]:
    """Job ids of the run's latest submission that are still queued or running (a requeued job
    too): a second submission beside them would write the same run_dir."""
    try:
        ids = set(json.loads(_jobs_file(cfg).read_text()).values())
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return []
    # -r: one line per array element; without it pending elements show as one "17_[0-1%2]"
    p = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i"], capture_output=True, text=True, check=False)
    return sorted(ids & set(p.stdout.split())) if p.returncode == 0 else []


def check_run_dir(cfg: Config, stages: list[str], in_flight: bool = True) -> None:
    """Before submitting ``stages`` of a run (pipeline.sh, hhdpo submit): training must not continue
    another config's run in run_dir, and no job of an earlier submission may still be queued."""
    run_dir = run_paths(cfg).run.resolve()
    if "train" in stages:
        changed = trained_with_other_config(cfg)
        if changed:
            raise ConfigError(
                f"run_dir {run_dir}: {run_paths(cfg).save} holds a training run with another config "
                f"({'; '.join(changed[:5])}); resuming it would continue that run. Choose another run_dir "
                "or move that one aside")
    busy = jobs_in_flight(cfg) if in_flight else []
    if busy:
        raise ConfigError(f"run_dir {run_dir}: job(s) {', '.join(busy)} of an earlier submission are still queued or "
                          "running; wait for them (a rerun then skips what they completed) or scancel them")


def sbatch_command(stage: str, config: str, overrides: list[str], log_dir: Path, depends_on: str | None,
                   extra: list[str]) -> list[str]:
    """The sbatch argv for one stage; ``depends_on`` is a job id or a ``$var`` placeholder."""
    cmd = ["sbatch", "--parsable", f"--job-name=hhdpo-{stage}", f"--output={log_dir}/%x-%j.out"]
    if depends_on:
        cmd += [f"--dependency=afterok:{depends_on}", "--kill-on-invalid-dep=yes"]
    repo = Path(os.environ.get("HHDPO_REPO") or REPO)  # pipeline.sh: its own checkout
    return [*cmd, *extra, str(repo / "slurm" / SCRIPTS[stage]), "--config", config, *overrides]


def _render(cmd: list[str]) -> str:
    # job-id placeholders stay unquoted so that the printed lines run as a shell script
    return " ".join(a if re.fullmatch(r"--dependency=afterok:\$\w+", a) else shlex.quote(a) for a in cmd)


def plan(cfg: Config) -> tuple[list[str], list[str]]:
    """(stages complete with this config, stages to submit): the complete prefix is skipped; once
    a stage is submitted every later one is too, so nothing runs on an older stage's outputs."""
    skipped = []
    for s in STAGES:
        if not is_complete(cfg, s):
            break
        skipped.append(s)
    return skipped, [s for s in STAGES if s not in skipped]


def pipeline(config: str, overrides: list[str], dry_run: bool, out=print) -> int:
    cfg = load_config(config, overrides)  # a bad key or value fails here, before anything is submitted
    config = str(Path(config).resolve())
    run_dir = run_paths(cfg).run.resolve()
    check_run_dir(cfg, plan(cfg)[1])
    skipped, todo = plan(cfg)
    log_dir = slurm_dir(cfg) / "logs"
    for s in skipped:
        m = read_marker(cfg, s) or {}
        out(f"# {s}: complete (job {m.get('job_id')}, config hash {m.get('config_hash')}); skipped")
    if not todo:
        out(f"# every stage is complete; nothing submitted\nrun_dir: {run_dir}")
        return EXIT_OK
    if not dry_run:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the -o directory
    prev, submitted = None, {}
    for s in todo:
        extra = shlex.split(os.environ.get(SBATCH_ENV[s], ""))
        if dry_run:
            cmd = sbatch_command(s, config, overrides, log_dir, prev and f"${prev}_job", extra)
            out(f"{s}_job=$({_render(cmd)})")
            prev = s
            continue
        cmd = sbatch_command(s, config, overrides, log_dir, prev, extra)
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            print(f"slurm/pipeline.sh: sbatch for {s} failed ({p.returncode}): {redact(p.stderr.strip())}",
                  file=sys.stderr)
            if prev:
                subprocess.run(["scancel", prev], check=False)
                print(f"slurm/pipeline.sh: cancelled job {prev}, submitted just before", file=sys.stderr)
            return 1
        prev = submitted[s] = p.stdout.strip().split(";")[0]
        record_jobs(cfg, submitted)
        out(f"{s}: job {prev}")
    if not dry_run:
        out(f"run_dir: {run_dir}")
        out(f"logs: {log_dir}")
    return EXIT_OK


# --------------------------------------------------------------------------- inside the jobs


def job_start(stage: str, cfg: Config, models: list[str] | None) -> dict[str, str]:
    """Checks before a stage runs, and the shell variables its script needs."""
    if stage in ("generate", "judge"):
        up = STAGES[STAGES.index(stage) - 1]
        m = read_marker(cfg, up)
        if m is not None and m.get("config_hash") != stage_hash(cfg, up, models):
            raise ConfigError(f"the {up} stage in {run_paths(cfg).run} was completed with another config "
                              f"(hash {m.get('config_hash')}, this config: {stage_hash(cfg, up, models)}): "
                              f"its outputs are not this config's; rerun {up} (slurm/pipeline.sh does)")
    if stage == "generate" and "policy" in (models or ["policy"]):
        state = run_paths(cfg).state
        status = json.loads(state.read_text()).get("status") if state.is_file() else "completed"
        if status != "completed":
            raise ConfigError(f"{state}: training status {status!r}, not completed: no generation from an "
                              "unfinished model")
    cleared = clear_markers_from(cfg, stage)
    job, restart = os.environ.get("SLURM_JOB_ID", "local"), int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    log = attempt_log(cfg, stage, job, restart)
    log.parent.mkdir(parents=True, exist_ok=True)
    return {"run_dir": str(run_paths(cfg).run.resolve()), "attempt_log": str(log),
            "cleared": " ".join(cleared)}


def _parse_job_args(argv: list[str]):
    from hhdpo.core.stage import StageParser

    if not argv or argv[0] not in STAGES:
        raise ConfigError(f"expected a stage ({', '.join(STAGES)}) first, got {argv[:1]}")
    p = StageParser(f"hhdpo.launch.slurm {argv[0]}", "inside a job: STAGE --config FILE [--models NAMES] [key=value ...]")
    p.flag("models", default=None, metavar="NAMES")
    ns = p.parse(argv[1:])
    models = [m.strip() for m in ns.models.split(",") if m.strip()] if ns.models else None
    return argv[0], load_config(ns.config, ns.overrides), models


def main(argv: list[str] | None = None) -> int:
    from hhdpo.core.stage import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("", [])

    def body() -> int:
        if cmd == "pipeline":
            dry = "--dry-run" in rest
            args = [a for a in rest if a != "--dry-run"]
            if args[:1] == ["--config"]:
                args = args[1:]
            if not args or args[0].startswith("-"):
                raise ConfigError("usage: slurm/pipeline.sh CONFIG [key=value ...] [--dry-run]")
            return pipeline(args[0], args[1:], dry)
        if cmd == "job-start":
            stage, cfg, models = _parse_job_args(rest)
            for k, v in job_start(stage, cfg, models).items():
                print(f"{k}={shlex.quote(v)}")
            return EXIT_OK
        if cmd == "job-done":
            stage, cfg, models = _parse_job_args(rest)
            why = judge_incomplete(cfg, models) if stage == "judge" else None
            if why:
                print(f"[slurm] judge incomplete, no completion marker (exit {EXIT_INCOMPLETE}): {why}; "
                      "rerun the judge stage to finish", file=sys.stderr)
                return EXIT_INCOMPLETE
            print(f"[slurm] {stage} complete: {write_marker(cfg, stage, models)}")
            return EXIT_OK
        if cmd == "requeue-decision" and len(rest) == 1:
            job = os.environ.get("SLURM_JOB_ID", "")
            left = os.environ.get("HHDPO_TIME_LEFT")  # container jobs: the host's squeue %L (no squeue inside)
            if left is not None:
                time_left = parse_time_left(left) if left.strip() else "unknown"
            else:
                time_left = squeue_time_left(job) if job else None
            requeue, line = requeue_decision(Path(rest[0]), job, time_left)
            print(f"[slurm] {line}")
            return EXIT_OK if requeue else EXIT_NO_REQUEUE
        raise ConfigError(f"usage: python -m hhdpo.launch.slurm pipeline|job-start|job-done|requeue-decision ...; got {argv!r}")

    return run_stage("slurm/pipeline.sh" if cmd == "pipeline" else f"hhdpo.launch.slurm {cmd}", body)


if __name__ == "__main__":
    sys.exit(main())
