"""``hhdpo submit sweep``: one training per grid point, one evaluation comparing them all.

    hhdpo submit sweep --config configs/smollm2_cpu.yaml dpo_training.dpo_beta=0.01,0.1,0.5 \\
        [dpo_training.loss_type=sigmoid,ipo ...] [key=value ...]

A value with commas (outside [...], {...} and quotes) is an axis; the points are every
combination of the axes, and only training keys can be swept (the evaluation is shared). Layout,
under ``run_dir``: ``<point>/`` per point (its own run: ``model/``, checkpoints, markers), e.g.
``dpo_beta-0.1/``; ``eval/`` with the base model's generations (once), each policy's, the judged
files, ``summary.*`` (each model against HH chosen, and each policy against the base, paired)
and ``sweep.json``, ``sweep.md`` and ``sweep.png``: one row per point with its swept values.

Jobs: the trainings (one SLURM job array, at most ``slurm.array_parallelism`` at once), a
generation per policy (after its training) and one for the base (right away), one judge job
after every generation, and a last job that writes the sweep table. Locally they run in turn.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import submitit

from hhdpo.core import numfmt
from hhdpo.core.config import Config, ConfigError, load_config, run_paths
from hhdpo.launch import slurm as hs

BASE = "base"


def split_values(value: str) -> list[str]:
    """``0.01,0.1`` -> ``['0.01', '0.1']``; commas inside brackets, braces or quotes do not split."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return [v.strip() for v in out + [cur]]


def parse_grid(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(fixed overrides, axes as (key, values)) from ``key=value`` overrides."""
    fixed, axes = [], []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        values = split_values(value) if sep else [value]
        if len(values) > 1:
            if any(v == "" for v in values):
                raise ConfigError(f"{key}: empty value in the sweep list {value!r}")
            if key in dict(axes):
                raise ConfigError(f"{key}: swept twice")
            axes.append((key, values))
        else:
            fixed.append(ov)
    return fixed, axes


def grid_points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vs for _, vs in axes))]


def point_name(point: dict[str, str]) -> str:
    """``{'dpo_training.dpo_beta': '0.1'}`` -> ``dpo_beta-0.1`` (a directory and a model name)."""
    shorts = [k.rsplit(".", 1)[-1] for k in point]
    parts = [f"{s if shorts.count(s) == 1 else k}-{v}" for s, (k, v) in zip(shorts, point.items())]
    return re.sub(r"[^\w.=+-]+", "_", "_".join(parts))


@dataclasses.dataclass
class Sweep:
    """The sweep's configs: one per point (its own run_dir) and the evaluation's."""

    root: Path
    axes: list[tuple[str, list[str]]]
    points: list[tuple[str, dict[str, str], Config]]
    eval_cfg: Config

    def manifest(self) -> dict:
        return {"axes": [k for k, _ in self.axes], "base": BASE,
                "points": [{"name": n, "values": p, "save_dir": str(run_paths(c).save)} for n, p, c in self.points]}


def plan_sweep(config_file: str, overrides: list[str]) -> Sweep:
    """Load and check every point's config (a bad key or value fails here, before any submission)."""
    fixed, axes = parse_grid(overrides)
    if not axes:
        raise ConfigError("hhdpo submit sweep: nothing to sweep; give a key with several values, e.g. "
                          "dpo_training.dpo_beta=0.01,0.1")
    train_keys = hs.STAGE_KEYS["train"]
    for key, _ in axes:
        if key.split(".")[0] not in train_keys:
            raise ConfigError(f"{key}: only training keys can be swept ({', '.join(train_keys)}); the evaluation "
                              "is shared by every point")
    base = load_config(config_file, fixed)
    root = run_paths(base).run.expanduser().resolve()
    points = []
    for p in grid_points(axes):
        name = point_name(p)
        cfg = load_config(config_file, [*fixed, *(f"{k}={v}" for k, v in p.items()), f"run_dir={root / name}"])
        points.append((name, p, cfg))
    saves = [run_paths(c).save.resolve() for _, _, c in points]
    if len(set(saves)) < len(saves):
        raise ConfigError(f"dpo_training.save_dir: {saves[0]} is absolute, so every point would train into it; "
                          "make it relative (to each point's run_dir)")
    names = [n for n, _, _ in points]
    if len(set(names)) < len(names) or BASE in names:
        raise ConfigError(f"sweep points' names collide: {names}")
    models = {**base.HH_test.models, **{n: str(run_paths(c).save) for n, _, c in points}}
    eval_cfg = dataclasses.replace(base, run_dir=str(root), HH_test=dataclasses.replace(base.HH_test, models=models))
    return Sweep(root, axes, points, eval_cfg)


def sweep_table(sweep: dict, summary: dict) -> dict:
    """Rows for the base and every point: win rate vs HH chosen (Wilson CI) and, for the
    points, the paired comparison with the base (difference = policy - base)."""
    files = {r["label"]: r for r in summary["files"]}
    vs_base = {c["b"]: c for c in summary["comparisons"] if c["a"] == BASE}
    rows = []
    for name, values in [(BASE, {}), *((p["name"], p["values"]) for p in sweep["points"])]:
        f = files.get(name)
        if f is None:
            raise ConfigError(f"summary.json has no judged file for {name!r} (labels: {sorted(files)})")
        c = vs_base.get(name)
        rows.append({"name": name, "values": values, "n": f["n"], "wins": f["wins"], "losses": f["losses"],
                     "ties": f["ties"], "errors": f["errors"], "win_rate": f["win_rate"], "win_rate_ci": f["win_rate_ci"],
                     "vs_base_diff": None if c is None or c["diff"] is None else -c["diff"],
                     "vs_base_test": c and c["test"], "vs_base_p": c and c["p_value"]})
    return {"axes": sweep["axes"], "confidence": summary["confidence"], "rows": rows}


def markdown(table: dict) -> str:
    axes = table["axes"]
    conf = f"{100 * table['confidence']:g}%"
    lines = ["| model | " + " | ".join(axes) + f" | n | W/L/T | win rate vs HH chosen | {conf} CI | "
             "vs base (policy − base) | p-value |",
             "|---|" + "---|" * len(axes) + "---:|---|---:|---|---:|---:|"]
    for r in table["rows"]:
        diff = "–" if r["vs_base_diff"] is None else f"{100 * r['vs_base_diff']:+.1f} pts ({r['vs_base_test']})"
        p = "–" if r["vs_base_p"] is None else numfmt.pval(r["vs_base_p"])
        lines.append(f"| {r['name']} | " + " | ".join(str(r["values"].get(a, "–")) for a in axes)
                     + f" | {r['n']} | {r['wins']}/{r['losses']}/{r['ties']} | {numfmt.pct(r['win_rate'])} | "
                     f"{numfmt.ci(r['win_rate_ci'])} | {diff} | {p} |")
    return "\n".join(lines)


def write_sweep_table(sweep: dict, eval_dir) -> dict:
    """sweep.json, sweep.md and sweep.png in ``eval_dir`` from its summary.json; returns the table."""
    from hhdpo.core.io import atomic_write_json, atomic_write_text
    from hhdpo.evaluation.summarize import plot_png

    eval_dir = Path(eval_dir)
    summary = json.loads((eval_dir / "summary.json").read_text())
    table = sweep_table(sweep, summary)
    atomic_write_json(eval_dir / "sweep.json", table)
    atomic_write_text(eval_dir / "sweep.md", markdown(table) + "\n")
    plot_png(summary, eval_dir / "sweep.png")
    print(markdown(table), flush=True)
    return table


def submit_sweep(config_file: str, overrides: list[str], **options) -> dict:
    """Submit the sweep; returns {"train": [...], "generate": [...], "judge": job, "table": job}
    (``table.result()`` is the comparison table)."""
    from hhdpo.core.io import atomic_write_json
    from hhdpo.launch.executor import absolute, check_run_dir, job_result, local_judge, make_executor, write_job_config
    from hhdpo.launch.jobs import GenerateJob, JudgeJob, TrainJob

    sw = plan_sweep(config_file, overrides)
    ev = absolute(sw.eval_cfg)
    local = ev.slurm.cluster != "slurm"
    for _, _, cfg in sw.points:
        check_run_dir(absolute(cfg), ["train"])
    check_run_dir(ev, [])
    s = ev.slurm
    ex = make_executor(ev, "train", nodes=s.nodes, tasks_per_node=s.ranks_per_node, gpus=s.gpus_per_node, **options)
    files = [str(write_job_config(absolute(c), "train")) for _, _, c in sw.points]
    if local:
        train = [ex.submit(TrainJob(), f) for f in files]
        for j in train:
            job_result(j)
    else:
        with ex.batch():  # one job array
            train = [ex.submit(TrainJob(), f) for f in files]
    eval_file = str(write_job_config(ev, "sweep-eval"))
    sweep_file = run_paths(ev).eval / "sweep_points.json"
    atomic_write_json(sweep_file, sw.manifest())

    def stage_job(stage, fn, args, after, gpus=0):
        job = make_executor(ev, stage, gpus=gpus, depends_on=[] if local else after, **options).submit(fn, *args)
        if local:
            job_result(job)
        return job

    gen = [stage_job("generate", GenerateJob(), (eval_file, [BASE], False), [], s.gpus_per_node)]
    gen += [stage_job("generate", GenerateJob(), (eval_file, [name], False), [t], s.gpus_per_node)
            for (name, _, _), t in zip(sw.points, train)]
    judge = stage_job("judge", JudgeJob(), (eval_file, [BASE, *(n for n, _, _ in sw.points)], False), gen,
                      s.gpus_per_node if local_judge(ev) else 0)
    table = make_executor(ev, "sweep-table", depends_on=[] if local else [judge], **options).submit(
        SweepTableJob(), eval_file, str(sweep_file))
    if not local:
        ids = {**{f"train:{n}": t.job_id for (n, _, _), t in zip(sw.points, train)},
               **{f"generate:{i}": g.job_id for i, g in enumerate(gen)}, "judge": judge.job_id, "table": table.job_id}
        hs.record_jobs(ev, ids)
    return {"train": train, "generate": gen, "judge": judge, "table": table, "sweep": sw}


def sweep_cli(args) -> int:
    """``hhdpo submit sweep`` (args from hhdpo.submit's parser)."""
    if args.dry_run:
        sw = plan_sweep(args.config, args.overrides)
        for name, point, cfg in sw.points:
            print(f"{name}: {' '.join(f'{k}={v}' for k, v in point.items())} -> {run_paths(cfg).save}")
        print(f"eval: {', '.join([BASE, *(n for n, _, _ in sw.points)])} -> {run_paths(sw.eval_cfg).eval}")
        return 0
    jobs = submit_sweep(args.config, args.overrides)
    for (name, _, _), t in zip(jobs["sweep"].points, jobs["train"]):
        print(f"train {name}: job {t.job_id}")
    print(f"generate: jobs {' '.join(g.job_id for g in jobs['generate'])}")
    print(f"judge: job {jobs['judge'].job_id}\ntable: job {jobs['table'].job_id}\nrun_dir: {jobs['sweep'].root}")
    if args.wait or jobs["sweep"].eval_cfg.slurm.cluster != "slurm":
        jobs["table"].result()  # one task
    return 0


class SweepTableJob(submitit.helpers.Checkpointable):
    """The sweep's last job: one table, JSON and chart comparing every point with the base."""

    def __call__(self, config_file: str, sweep_file: str) -> dict:
        cfg = load_config(config_file)
        return write_sweep_table(json.loads(Path(sweep_file).read_text()), run_paths(cfg).eval)
