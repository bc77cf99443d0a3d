"""The stage contract every launcher relies on: one CLI convention and one set of exit codes."""

from __future__ import annotations

import importlib
import json

import pytest

from hhdpo.core.stage import STAGES
from tests.conftest import run_cli

CONFIG_STAGES = [s for s in STAGES if s != "report"]


def stage_cli(stage):
    cli = importlib.import_module(STAGES[stage][0]).cli
    if stage == "submit":  # `hhdpo submit KIND ...`: the contract holds for each kind; --dry-run submits nothing
        return lambda argv: cli(["train", "--dry-run", *argv])
    return cli


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"run_dir: {tmp_path / 'run'}\npolicy_model: smollm2\n")
    return p


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_lists_both_spellings_and_exit_codes(stage, capsys):
    with pytest.raises(SystemExit) as e:
        stage_cli(stage)(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "exit status: 0 done, 2 bad config or input" in out and "42 preempted" in out
    options = [ln for ln in out.splitlines() if ln.startswith("  --")]
    assert options
    for line in options:  # every multi-word flag is offered in both spellings, on one help line
        line = line.strip().split("  ")[0]  # the invocation, not the help text
        for word in line.split():
            flag = word.rstrip(",")
            if flag.startswith("--") and "_" in flag[2:] and not flag.startswith(("--no-", "--no_")):
                assert flag.replace("_", "-") in line, f"{stage}: {flag} has no hyphenated spelling"


@pytest.mark.parametrize("stage", CONFIG_STAGES)
def test_unknown_config_key_exits_2_naming_it_with_options_in_any_order(stage, cfg_file, capsys):
    # an override before and after an option: parse_intermixed_args, no "unrecognized arguments"
    argv = ["--config", str(cfg_file), "dpo_training.max_steps=2", "--models", "policy", "dpo_training.nosuch_key=1"]
    if stage in ("train", "data", "upload", "submit", "plan"):
        argv.remove("--models"), argv.remove("policy")
    if stage == "train":
        argv[3:3] = ["--nproc-per-node", "1"]
    assert stage_cli(stage)(argv) == 2
    err = capsys.readouterr().err
    prog = "hhdpo submit train" if stage == "submit" else f"hhdpo {stage}"
    assert f"{prog}: error: dpo_training.nosuch_key: unknown config key" in err and "Traceback" not in err


@pytest.mark.parametrize("stage", CONFIG_STAGES)
def test_bad_value_exits_2(stage, cfg_file, capsys):
    argv = ["--config", str(cfg_file), "judge.concurrency=zero"]
    assert stage_cli(stage)(argv) == 2
    assert "judge.concurrency: got 'zero' (str), expected an integer" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path, capsys):
    for stage in CONFIG_STAGES:
        assert stage_cli(stage)(["--config", str(tmp_path / "nope.yaml")]) == 2, stage
        assert "nope.yaml: not found" in capsys.readouterr().err


def test_malformed_input_line_exits_2_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    good = {"idx": 0, "prompt": "p", "a": "x", "b": "y", "response": "x", "HH_response": "y", "a_id": "m",
            "b_id": "hh_chosen", "is_swapped": False, "winner": "a", "winner_model_vs_chosen": "model",
            "model_id": "m", "chosen_id": "hh_chosen"}
    bad.write_text(json.dumps(good) + '\n{"idx": 1,\n')
    out = tmp_path / "y.jsonl"
    cases = {
        "pairwise": ["--in_file", str(bad), "--out-file", str(out)],
        "judge": ["--in-file", str(bad), "--out_file", str(out), "--base-url", "http://127.0.0.1:9/v1"],
        "summarize": [str(bad)],
    }
    for stage, argv in cases.items():
        assert stage_cli(stage)(argv) == 2, stage
        assert "x.jsonl:2" in capsys.readouterr().err, stage
    assert not out.exists()


def test_config_driven_pairwise_uses_the_run_paths(tmp_path, cfg_file):
    """`hhdpo pairwise --config` finds the generations and writes next to them (one path rule)."""
    run = tmp_path / "run"
    gen = run / "eval_outputs"
    gen.mkdir(parents=True)
    recs = [{"idx": i, "prompt": f"\n\nHuman: q{i}\n\nAssistant:", "response": f"r{i}", "HH_response": f"c{i}",
             "model_id": "policy_model"} for i in range(6)]
    for name in ("policy", "base"):
        (gen / f"{name}_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert stage_cli("pairwise")(["--config", str(cfg_file), "eval.seed=3"]) == 0
    for name in ("policy", "base"):
        pw = [json.loads(x) for x in (gen / f"{name}_pairwise.jsonl").read_text().splitlines()]
        assert [r["idx"] for r in pw] == list(range(6)) and {name, "hh_chosen"} == {pw[0]["a_id"], pw[0]["b_id"]}
        assert all(r["shuffle_seed"] == 3 for r in pw)


def test_data_error_inside_a_training_worker_exits_2_without_traceback(tmp_path, hh_file, tiny_llama_dir):
    """3 pairs cannot make a batch of 4: the worker raises DataError; the launcher must say 2, not 1."""
    r = run_cli("train", "--config", "configs/smollm2_cpu.yaml", f"policy_model={tiny_llama_dir}",
                f"ref_model={tiny_llama_dir}", f"dataset.dataset_name={hh_file}", "dataset.subset=test[:3]",
                "dataset.val_ratio=0", f"run_dir={tmp_path}", "dpo_training.save_dir=run", timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "too few" in r.stderr and "Traceback" not in r.stderr
