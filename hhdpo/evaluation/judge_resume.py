"""The judge's files: which pairs to judge, where verdicts go, and which saved verdicts are current.

A saved verdict is current when its idx is still in the pairwise file and its ``judge_key``
(a hash of the pair's prompt, responses and ids, the judge model and template) matches the
pair's now. Files written before ``judge_key`` existed: the key is computed from the
record's own saved pair and judge fields, which are what the judge saw; records lacking
them are re-judged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Optional

from hhdpo.core.io import DataError, iter_jsonl

DEFAULT_MODELS = ("policy", "base")


def judge_key(rec: dict, model, template) -> Optional[str]:
    """Hash of what a verdict depends on: the pair's prompt, responses and their ids (the
    model/chosen mapping), the judge model and template. None when the pair fields are missing."""
    fields = [rec.get(k) for k in ("prompt", "a", "b", "a_id", "b_id")]
    if not all(isinstance(f, str) for f in fields):
        return None
    blob = json.dumps([*fields, model, template], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_saved(saved: list[dict], pairs: list[dict], model: str, template: str,
                retry_errors: bool = False) -> tuple[list[dict], Counter]:
    """Saved verdicts still current for ``pairs``, and a count of the others by reason."""
    want = {p["idx"]: judge_key(p, model, template) for p in pairs}
    keep, dropped = [], Counter()
    for r in saved:
        # pre-judge_key files: the record itself holds the pair and judge it was judged with
        key = r.get("judge_key") or judge_key(r, r.get("judge_model"), r.get("judge_template"))
        if r.get("idx") not in want:
            dropped["no longer in the pairwise file"] += 1
        elif key is None:
            dropped["saved without the pair fields to check it"] += 1
        elif key != want[r["idx"]]:
            dropped["prompt or responses changed"] += 1
        elif retry_errors and r.get("judge_error"):
            dropped["judge_error (--retry-errors)"] += 1
        else:
            keep.append(r)
    return keep, dropped


def load_pairs(path) -> list[dict]:
    """Read a pairwise file; a bad line raises DataError naming file:line."""
    pairs, seen = [], {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("prompt", "a", "b"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{where}: {key!r} missing or not a string (is this a pairwise file?)")
        rec.setdefault("idx", lineno)
        rec.setdefault("a_id", "a")
        rec.setdefault("b_id", "b")
        if rec["idx"] in seen:
            raise DataError(f"{where}: duplicate idx {rec['idx']!r} (first at line {seen[rec['idx']]})")
        seen[rec["idx"]] = lineno
        pairs.append(rec)
    return pairs


@contextlib.contextmanager
def exclusive(out_path: Path):
    """One judge per out_file: two writers (e.g. a requeued job while the old one still runs)
    would judge the same missing idx twice. flock is released by the kernel even on SIGKILL."""
    import fcntl

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path.with_name(f".{out_path.name}.lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{out_path}: another hhdpo judge is writing it (lock held); wait for it or "
                            "pick another --out_file") from None
        yield


def default_out_file(in_file) -> Path:
    """``x_pairwise.jsonl`` -> ``x_judged.jsonl``; otherwise ``<stem>_judged.jsonl``."""
    p = Path(in_file)
    name = p.name[:-6] if p.name.endswith(".jsonl") else p.stem
    name = name.replace("pairwise", "judged") if "pairwise" in name else name + "_judged"
    return p.with_name(name + ".jsonl")


def model_files(cfg, names) -> tuple[list[Path], list[Path]]:
    """The pairwise and judged files of models ``names`` in the eval directory, as ``hhdpo eval`` names them."""
    from hhdpo.core.config import run_paths

    d = run_paths(cfg).eval
    return [d / f"{n}_pairwise.jsonl" for n in names], [d / f"{n}_judged.jsonl" for n in names]
