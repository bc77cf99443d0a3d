"""hhdpo upload: what goes where (dry run), the model card, the missing-token error, the Hub calls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hhdpo import upload as U

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_SECRETtoken987"

CONFIG_YAML = f"""policy_model: HuggingFaceTB/SmolLM2-135M-Instruct
dpo_training:
  dpo_beta: 0.1
  save_dir: {{save}}
huggingface:
  model_repo: me/dpo-smollm2
  logs_repo: me/dpo-smollm2-logs
  private: true
wandb:
  run_name: leaked-{SECRET}
"""


@pytest.fixture
def run_dir(tmp_path):
    """A finished training run laid out like hhdpo train's save_dir, plus eval outputs."""
    save = tmp_path / "dpo_model"
    (save / "checkpoints" / "step_0000010").mkdir(parents=True)
    (save / "checkpoints" / "step_0000010" / "model.pt").write_bytes(b"0" * 100)
    (save / "logs" / "margins").mkdir(parents=True)
    (save / "logs" / "margins" / "margins_step10.jsonl").write_text('{"step": 10, "margin": 0.3}\n')
    (save / "config.json").write_text('{"model_type": "llama"}')
    (save / "model.safetensors").write_bytes(b"\1" * 123_456)
    (save / "tokenizer.json").write_text("{}")
    (save / "config.yaml").write_text(CONFIG_YAML.format(save=save))
    (save / "run_state.json").write_text("{}")
    (save / ".wandb_run_id").write_text("abcd")
    (save / "metrics.jsonl").write_text(
        '{"step": 5, "loss": 0.69}\n{"step": 10, "loss": 0.5123456789, "reward_acc": 0.75}\n{"step": 1')  # torn tail
    ev = tmp_path / "eval_outputs"
    ev.mkdir()
    (ev / "policy_judged.jsonl").write_text('{"idx": 0}\n')
    (ev / "summary.json").write_text(json.dumps({"confidence": 0.95, "comparisons": [], "files": [{
        "file": "policy_judged.jsonl", "label": "policy_model", "judge_models": ["gpt-4o-mini"], "n": 10,
        "wins": 6, "losses": 3, "ties": 1, "errors": 0, "win_rate": 6 / 9, "win_rate_ci": [0.35, 0.88],
        "win_rate_ties_half": 0.65, "win_rate_ties_half_ci": [0.36, 0.85], "agreement_rate": None}]}))
    return save, ev


def test_dry_run_lists_files_and_sizes_without_a_token(run_dir, monkeypatch, capsys):
    save, ev = run_dir
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert U.cli(["--model_dir", str(save), "--eval_dir", str(ev), "--dry-run"]) == 0
    out = capsys.readouterr().out
    model_part, logs_part = out.split("logs -> ")
    assert "model -> me/dpo-smollm2 (model, private): 5 files" in model_part
    for name in ("README.md", "config.json", "config.yaml", "model.safetensors", "tokenizer.json"):
        assert f"  {name} " in model_part
    assert "123.5 kB" in model_part
    for excluded in ("metrics.jsonl", "run_state.json", "checkpoints", ".wandb_run_id", "margins"):
        assert excluded not in model_part
    assert logs_part.startswith("me/dpo-smollm2-logs (dataset, private)")
    for name in ("margins/margins_step10.jsonl", "metrics.jsonl", "eval/policy_judged.jsonl", "eval/summary.json",
                 "config.yaml", "README.md"):
        assert f"  {name} " in logs_part
    assert "\n  summary.json " not in logs_part  # inside eval_dir: uploaded once
    assert "checkpoints" not in logs_part and "dry run: nothing uploaded" in out


def test_model_card_has_redacted_config_last_metrics_and_win_rates(run_dir, monkeypatch):
    save, ev = run_dir
    monkeypatch.setenv("HF_TOKEN", SECRET)
    targets = U.plan(U.Sources(save, save / "logs" / "margins", save / "metrics.jsonl", ev, ev / "summary.json"),
                     "me/dpo-smollm2", "me/dpo-smollm2-logs")
    model = targets[0]
    card = next(i.source for i in model.items if i.path_in_repo == "README.md").decode()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "dpo_beta: 0.1" in card and "run_name: leaked-***" in card
    assert "| loss | 0.512346 |" in card and "| reward_acc | 0.75 |" in card  # last complete metrics line
    assert "| policy_model | 10 | 6 | 3 | 1 | 0 | 66.7% |" in card and "gpt-4o-mini" in card
    assert "https://huggingface.co/datasets/me/dpo-smollm2-logs" in card
    for t in targets:
        for item in t.items:
            data = item.source if isinstance(item.source, bytes) else item.source.read_bytes()
            assert SECRET.encode() not in data, item.path_in_repo


def test_missing_token_is_a_clear_error(run_dir, tmp_path):
    save, ev = run_dir
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no saved login either
    res = subprocess.run([sys.executable, "-m", "hhdpo.upload", "--model_dir", str(save), "--eval_dir", str(ev)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2  # bad input: the documented exit code
    assert "HF_TOKEN is not set" in res.stderr and "--dry-run" in res.stderr


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def create_commit(self, repo_id, operations, commit_message, repo_type):
        self.calls.append(("commit", repo_id, repo_type, sorted(op.path_in_repo for op in operations)))
        return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


def test_upload_makes_one_commit_per_repo(run_dir):
    save, ev = run_dir
    targets = U.plan(U.Sources(save, save / "logs" / "margins", save / "metrics.jsonl", ev, ev / "summary.json"),
                     "me/m", "me/l")
    api = FakeApi()
    urls = U.upload(targets, private=False, token="hf_x", api=api)
    assert urls == ["https://hub/me/m/commit/1", "https://hub/me/l/commit/1"]
    assert api.calls[0] == ("create_repo", "me/m", "model", False, True)
    assert api.calls[1] == ("commit", "me/m", "model",
                            ["README.md", "config.json", "config.yaml", "model.safetensors", "tokenizer.json"])
    assert api.calls[2] == ("create_repo", "me/l", "dataset", False, True)
    assert api.calls[3][:3] == ("commit", "me/l", "dataset") and "margins/margins_step10.jsonl" in api.calls[3][3]


def test_unconfigured_repo_and_non_model_dir_are_refused(run_dir, tmp_path, capsys):
    save, ev = run_dir
    with pytest.raises(U.UploadError, match="no model repo"):
        U.plan(U.Sources(save), None, None, "model")
    with pytest.raises(U.UploadError, match="no config.json"):
        U.plan(U.Sources(tmp_path / "nowhere"), "me/m", None, "model")
    assert U.cli(["--model_dir", str(tmp_path), "--model_repo", "me/m", "--only", "model", "--dry-run"]) == 2
    assert "not a trained model directory" in capsys.readouterr().err
