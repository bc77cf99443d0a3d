"""The policy trains with dropout off, as TRL's DPO does: a model whose config has dropout starts
at exactly ln 2 (policy == reference at step 1), and the export keeps the base model's rates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hhdpo.core.io import read_jsonl
from tests.conftest import run_cli
from tests.training.test_train import CFG, base_overrides


def _dropout_model(kind: str, smollm2_dir, out):
    """A tiny random model with real dropout, SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    if kind == "llama":  # dropout only as a float the attention reads in train mode (no nn.Dropout)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                             tie_word_embeddings=True, attention_dropout=0.3, **ids))
    else:  # GPT-2: nn.Dropout modules (embeddings, attention, residual)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=2048,
                                           resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2, **ids))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def dropout_model(request, tmp_path_factory, smollm2_dir):
    return request.param, _dropout_model(request.param, smollm2_dir, tmp_path_factory.mktemp(f"dropout-{request.param}"))


RATES = {"llama": {"attention_dropout": 0.3}, "gpt2": {"resid_pdrop": 0.2, "embd_pdrop": 0.2, "attn_pdrop": 0.2}}


def test_build_model_turns_dropout_off_for_policy_and_reference(dropout_model):
    from hhdpo.core.config import Config
    from hhdpo.core.models import load_model
    from hhdpo.training.runtime import build_model

    kind, path = dropout_model
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = load_model(str(path)).train()
    with torch.no_grad():  # the model really has dropout: two train-mode forwards differ
        assert not torch.equal(plain(input_ids=ids).logits, plain(input_ids=ids).logits)
    for trainable in (True, False):
        model, hf_config, _ = build_model(Config(), str(path), trainable, torch.device("cpu"), torch.float32, 1, False)
        assert model.training == trainable
        model.train()  # even in train mode: no randomness left
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert all(getattr(model.config, k) == 0 for k in RATES[kind])
        assert {k: getattr(hf_config, k) for k in RATES[kind]} == RATES[kind]  # the copy that is exported


def test_first_step_loss_is_ln2_with_a_dropout_model(tmp_path, hh_file, dropout_model):
    kind, path = dropout_model
    save = tmp_path / "run"
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 2,
                                                                            "dpo_training.batch_size": 2}),
                f"policy_model={path}", f"ref_model={path}")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [m["loss"] for m in read_jsonl(save / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 2
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6, abs=0)  # policy == reference, dropout or not
    # the exported model keeps the base model's dropout rates (for whoever trains it next)
    saved = json.loads((save / "config.json").read_text())
    assert {k: saved[k] for k in RATES[kind]} == RATES[kind]
