"""The one path rule (outputs relative to run_dir), saved configs usable from anywhere, redaction."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from hhdpo.core.config import load_config, redact, run_paths, save_config

REPO = Path(__file__).resolve().parents[2]


def test_every_output_key_follows_run_dir(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "dpo_training.save_dir=m", "HH_test.HH_test_policy_out=g/p.jsonl",
                             "HH_test.HH_test_base_out=g/b.jsonl"])
    p = run_paths(cfg)
    assert (p.save, p.ckpt, p.tail, p.metrics, p.state) == (
        tmp_path / "m", tmp_path / "m/checkpoints", tmp_path / "m/logs/margins", tmp_path / "m/metrics.jsonl",
        tmp_path / "m/run_state.json")
    # eval outputs default to where the generations go, not ./eval_outputs of the working directory
    assert (p.policy_out, p.base_out, p.eval) == (tmp_path / "g/p.jsonl", tmp_path / "g/b.jsonl", tmp_path / "g")
    assert p.gen_out("beta0.05") == tmp_path / "g/beta0.05_out.jsonl"
    explicit = run_paths(load_config(None, [f"run_dir={tmp_path}", "checkpoint.dir=ck", "tail_test.log_dir=/abs/t",
                                            "eval.out_dir=ev"]))
    assert (explicit.ckpt, explicit.tail, explicit.eval) == (tmp_path / "ck", Path("/abs/t"), tmp_path / "ev")


def test_run_dir_unset_is_the_working_directory():
    p = run_paths(load_config(REPO / "tests/data/seed_config.yaml", ["policy_model=smollm2"]))
    assert p.save == Path("dpo_model") and p.tail == Path("logs/margins") and p.eval == Path("eval_outputs")


def test_saved_config_finds_the_run_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs/smollm2_cpu.yaml", ["run_dir=runs/r1"])
    saved = save_config(cfg, run_paths(cfg).save)
    assert yaml.safe_load(saved.read_text())["run_dir"] == str(tmp_path / "runs/r1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = run_paths(load_config(tmp_path / "runs/r1/model/config.yaml"))
    assert again.save == tmp_path / "runs/r1/model" and again.eval == tmp_path / "runs/r1/eval"


def test_redact_scrubs_known_and_custom_key_variables(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-known-123456")
    monkeypatch.setenv("MYLAB_JUDGE_API_KEY", "custom-judge-secret")  # a judge.api_key_env of the user's choosing
    monkeypatch.setenv("HOME_DIRNAME", "not-a-secret")
    text = "k1=sk-known-123456 k2=custom-judge-secret url=https://user:pw@host/x home=not-a-secret"
    assert redact(text) == "k1=*** k2=*** url=https://***@host/x home=not-a-secret"
    assert "custom-judge-secret" not in redact(os.environ["MYLAB_JUDGE_API_KEY"])
