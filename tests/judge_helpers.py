"""Shared by the judge tests: pairwise files from real HH rows with known verdicts, and a
judge run against the fake server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from hhdpo.core.config import JudgeConfig
from hhdpo.evaluation.judge import JudgeSettings, judge_files
from hhdpo.evaluation.pairwise import make_pairwise
from tests.fake_responses_server import hh_generation_records

_CONFIG_KEYS = {f.name for f in dataclasses.fields(JudgeConfig)}


def make_pairs(tmp_path, n, shuffle=True, name="policy", out_dir=None):
    """(pairwise file, its records, expected outcome per idx).

    The fake judge prefers the longer response; each generation record's ``response`` is the
    model's and ``HH_response`` the chosen one (never of equal length), so the outcome is
    known from the generations alone, whatever the A/B order.
    """
    gens = hh_generation_records(n)
    Path(tmp_path).mkdir(parents=True, exist_ok=True)
    gen = Path(tmp_path) / f"{name}_out.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in gens))
    pw = Path(out_dir or tmp_path) / f"{name}_pairwise.jsonl"
    pw.parent.mkdir(parents=True, exist_ok=True)
    make_pairwise(gen, pw, shuffle_ab=shuffle, seed=1)
    expect = {g["idx"]: "model" if len(g["response"]) > len(g["HH_response"]) else "chosen" for g in gens}
    return pw, read(pw), expect


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def settings(srv=None, **kw):
    """JudgeSettings from keyword arguments: judge config keys go to its JudgeConfig."""
    kw = {"model": "fake-judge", "backoff_base": 0.01, "concurrency": 8, "progress": False, **kw}
    if srv is not None:
        kw.setdefault("base_url", srv.base_url)
    cfg = JudgeConfig(**{k: v for k, v in kw.items() if k in _CONFIG_KEYS})
    return JudgeSettings(cfg, **{k: v for k, v in kw.items() if k not in _CONFIG_KEYS})


def run(pw, out, srv, log=None, **kw):
    return asyncio.run(judge_files([pw], [out], settings(srv, **kw), log=log or (lambda m: None)))
