"""Read a run's logs for ``hhdpo report``: training metrics, tail-test logs, eval summary.

Where they are comes from :func:`hhdpo.core.config.run_paths`. A missing piece (no eval yet,
tail test off, training not started) becomes a note, never an error; a piece that is
there but unreadable (empty or malformed ``metrics.jsonl``, a record without a step) is a
:class:`DataError` naming ``file:line``, since a report drawn from it would mislead.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hhdpo.core.io import DataError, iter_jsonl

EVAL_PREFIX = "eval/"


@dataclass
class RunLogs:
    """What a run has logged so far; each list is in step order."""

    train: list[dict] = field(default_factory=list)  # metrics.jsonl training records (loss, rewards/..., grad_norm, lr)
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl validation records (eval/loss, ...)
    margins: list[dict] = field(default_factory=list)  # global_margins_log.jsonl (p10, median, p90 per step)
    tail: list[dict] = field(default_factory=list)  # global_tail_test_and_beta_log.jsonl per-step records (tau, p_hat, beta)
    warmup_end: Optional[dict] = None  # the tail log's warmup_end record (tau_0)
    state: Optional[dict] = None  # run_state.json (status, step, total_steps)
    summary: Optional[dict] = None  # the eval summary.json
    notes: list[str] = field(default_factory=list)  # missing pieces, where they were looked for


def _step_records(path: Path, what: str, require_nonempty: bool) -> list[dict]:
    """Records of a step-indexed JSONL, sorted by step; a record without a numeric step is a DataError."""
    out = []
    for lineno, rec in iter_jsonl(path):
        if not rec:  # `{}`: what training logs for a validation set smaller than one batch
            continue
        if not isinstance(rec.get("step"), numbers.Real) or isinstance(rec.get("step"), bool):
            raise DataError(f"{path}:{lineno}: {what} record without a numeric 'step' (keys: {', '.join(rec) or 'none'})")
        out.append(rec)
    if require_nonempty and not out:
        raise DataError(f"{path}:1: empty {what} file (no records)")
    return sorted(out, key=lambda r: r["step"])


def split_metrics(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training records and validation records (those with ``eval/...`` keys)."""
    evals = [r for r in records if any(k.startswith(EVAL_PREFIX) for k in r)]
    return [r for r in records if not any(k.startswith(EVAL_PREFIX) for k in r)], evals


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}:1: expected a JSON object, got {type(data).__name__}")
    return data


def read_run(cfg) -> RunLogs:
    """Everything the report draws, for the run ``cfg`` describes (see the module doc)."""
    from hhdpo.core.config import run_paths

    paths = run_paths(cfg)
    logs = RunLogs()
    if paths.metrics.is_file():
        logs.train, logs.evals = split_metrics(_step_records(paths.metrics, "metrics", require_nonempty=True))
    else:
        logs.notes.append(f"no training metrics at {paths.metrics} (training not run or not logged yet)")
    margins, tail = paths.tail / "global_margins_log.jsonl", paths.tail / "global_tail_test_and_beta_log.jsonl"
    if margins.is_file():
        logs.margins = _step_records(margins, "margins log", require_nonempty=False)
    if tail.is_file():
        recs = _step_records(tail, "tail-test log", require_nonempty=False)
        ends = [r for r in recs if r.get("type") == "warmup_end"]
        logs.warmup_end = ends[-1] if ends else None
        logs.tail = [r for r in recs if r.get("type") != "warmup_end"]
    if not margins.is_file() and not tail.is_file():
        logs.notes.append(f"no tail-test logs in {paths.tail} (tail_test.enabled is false, or no step logged yet)")
    if paths.state.is_file():
        logs.state = _read_json(paths.state)
    summary = paths.eval / "summary.json"
    if summary.is_file():
        logs.summary = _read_json(summary)
        if not isinstance(logs.summary.get("files"), list) or not logs.summary["files"]:
            raise DataError(f"{summary}:1: no 'files' list of summarized models")
    else:
        logs.notes.append(f"no eval summary at {summary} (run `hhdpo eval` or `hhdpo summarize --config ...`)")
    return logs


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``, skipping records without a number there."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return xs, ys
