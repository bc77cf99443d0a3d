"""Padding-free batches (one packed row per micro-batch) against padded rows and against each
sequence run alone: same log-probs, losses and gradients; unwrapped, with activation
checkpointing, under FSDP2 on 2 ranks, and in a short ``hhdpo train`` run."""

from __future__ import annotations

import math

import pytest
import torch

from hhdpo.core.io import read_jsonl
from hhdpo.training.forward import pair_batch, response_logps
from hhdpo.training.loss import preference_loss, sequence_logps
from tests.conftest import run_cli
from tests.training.test_model_loading import _init, _spawn
from tests.training.test_train import CFG, base_overrides

CPU = torch.device("cpu")


def hh_examples(hh_file, model_dir, n, max_len=96) -> list[dict]:
    from transformers import AutoTokenizer

    from hhdpo.core.config_schema import DatasetConfig
    from hhdpo.data.hh import load_pairs, tokenize_pairs

    pairs, _ = load_pairs(str(hh_file), f"test[:{n}]", [], log=None)
    return tokenize_pairs(pairs, AutoTokenizer.from_pretrained(model_dir), DatasetConfig(max_len=max_len, max_prompt_len=max_len * 2 // 3))


def load(model_dir, checkpointing=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def alone(model, examples, average) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response scored by its own unpadded forward with the full LM head: the reference."""
    with torch.no_grad():
        out = {key: torch.stack([sequence_logps(model(input_ids=torch.tensor([ex["prompt_ids"] + ex[key]])).logits,
                                                torch.tensor([[-100] * len(ex["prompt_ids"]) + ex[key]]), average)[0]
                                 for ex in examples]) for key in ("chosen_ids", "rejected_ids")}
    return out["chosen_ids"], out["rejected_ids"]


def logps_and_grads(model, examples, padding_free, by_length=False, average=False, chunk=0, share_prompt=False):
    model.zero_grad(set_to_none=True)
    c, r = response_logps(model, pair_batch(examples, 0, by_length, CPU, padding_free, share_prompt), average, chunk)
    # a DPO loss against a fixed reference, so every parameter gets a gradient through both sides
    losses, _, _ = preference_loss(c, r, c.detach() + 1.0, r.detach() - 2.0, 0.1)
    losses.mean().backward()
    return c.detach(), r.detach(), losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n, g in a.items():
        torch.testing.assert_close(g, b[n], rtol=1e-5, atol=1e-6, msg=n)
        assert g.abs().sum() > 0, n


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_equals_padded_and_each_sequence_alone(hh_file, tiny_llama_dir, checkpointing):
    """Tiny Llama, real HH pairs, micro-batches of 1 to 4 pairs: the packed row gives every sequence's
    log-prob as its own forward does, and the same losses and gradients as the padded rows; so does
    the row with each prompt once. With activation checkpointing the layers rerun in backward, where
    the packed attention must hold too."""
    examples = hh_examples(hh_file, tiny_llama_dir, 10)
    model = load(tiny_llama_dir, checkpointing)
    for batch, average in ((examples[:1], False), (examples[1:4], True), (examples[4:8], False)):
        c0, r0 = alone(model, batch, average)
        cp, rp, lp, gp = logps_and_grads(model, batch, True, average=average)  # first: switches the attention
        cd, rd, ld, gd = logps_and_grads(model, batch, False, average=average)  # padded rows after the switch
        cg, rg, lg, gg = logps_and_grads(model, batch, False, by_length=True, average=average)
        cs, rs, ls, gs = logps_and_grads(model, batch, True, average=average, share_prompt=True)
        for c, r in ((cp, rp), (cd, rd), (cg, rg), (cs, rs)):
            torch.testing.assert_close(c, c0, rtol=1e-5, atol=0)
            torch.testing.assert_close(r, r0, rtol=1e-5, atol=0)
        for other, grads in ((ld, gd), (lg, gg), (ls, gs)):
            torch.testing.assert_close(lp, other, rtol=1e-5, atol=0)
            assert_grads_close(gp, grads)
    assert model.config._attn_implementation == "hhdpo_packed:sdpa"


def test_smollm2_packed_equals_padded(hh_file, smollm2_dir):
    examples = hh_examples(hh_file, smollm2_dir, 2, max_len=64)
    model = load(smollm2_dir)
    cp, rp, lp, gp = logps_and_grads(model, examples, True)
    cd, rd, ld, gd = logps_and_grads(model, examples, False)
    cs, rs, ls, gs = logps_and_grads(model, examples, True, share_prompt=True)
    c0, r0 = alone(model, examples, False)
    for c, r in ((cp, rp), (cd, rd), (cs, rs)):
        torch.testing.assert_close(c, c0, rtol=1e-5, atol=0)
        torch.testing.assert_close(r, r0, rtol=1e-5, atol=0)
    for loss, grads in ((ld, gd), (ls, gs)):
        torch.testing.assert_close(lp, loss, rtol=1e-5, atol=0)
        for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            torch.testing.assert_close(gp[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_policy_equal_to_reference_gives_ln2_whatever_the_packing(hh_file, tiny_llama_dir):
    """Step 1 (policy == reference): ln 2 for every pair, with the reference forwarded packed or
    padded (a reference cache computed under the other setting), grouped by length or not."""
    examples = hh_examples(hh_file, tiny_llama_dir, 4)
    policy, ref = load(tiny_llama_dir), load(tiny_llama_dir).requires_grad_(False)
    for policy_packed, ref_packed, by_length, shared in ((True, True, False, (False, False)), (True, False, True, (False, False)),
                                                         (False, True, False, (False, False)), (True, True, False, (True, False)),
                                                         (True, False, True, (True, False)), (True, True, False, (True, True))):
        pc, pr = response_logps(policy, pair_batch(examples, 0, False, CPU, policy_packed, shared[0]), False, 7)
        with torch.no_grad():
            rc, rr = response_logps(ref, pair_batch(examples, 0, by_length, CPU, ref_packed, shared[1]), False)
        losses, _, _ = preference_loss(pc, pr, rc, rr, 0.1)
        torch.testing.assert_close(losses, torch.full((4,), math.log(2)), rtol=1e-6, atol=0)


def test_attention_stays_inside_each_sequence():
    """The per-sequence attention against SDPA on the whole row with the block-diagonal causal mask
    (grouped-query heads: 4 query heads on 2 key/value heads)."""
    from types import SimpleNamespace

    from hhdpo.data.packing import pack_rows
    from hhdpo.training.packed_attention import _packed_attention

    p = pack_rows([([1] * n, [-100] * n) for n in (5, 1, 9, 3)])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 18, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 18, 8, generator=g, dtype=torch.float64) for _ in range(2))
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, config=SimpleNamespace(_attn_implementation="hhdpo_packed:sdpa"))
    out, _ = _packed_attention(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=p["cu_seqlens"])
    # the expected value by hand-built dense attention: softmax over allowed keys only
    from hhdpo.data.packing import block_causal_mask

    mask = block_causal_mask(p["seq"])
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) @ vv).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_shared_prompt_attention_is_the_masked_dense_attention():
    """The shared-prompt attention against SDPA on the whole row with :func:`shared_prompt_mask`
    (hand-checked in tests/data/test_packing.py), grouped-query heads."""
    from types import SimpleNamespace

    from hhdpo.data.packing import pack_shared_prompt, shared_prompt_mask
    from hhdpo.training.packed_attention import SHARED, _packed_attention

    ex = [{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r} for p, c, r in ((4, 2, 3), (1, 5, 1), (6, 1, 4))]
    p = pack_shared_prompt(ex)
    n = p["input_ids"].shape[1]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, config=SimpleNamespace(_attn_implementation="hhdpo_packed:sdpa"))
    out, _ = _packed_attention(module, q, k, v, None, scaling=0.3, **{SHARED: p["bounds"]})
    mask = shared_prompt_mask(p["bounds"].tolist())
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, (scores.softmax(-1) @ vv).transpose(1, 2), rtol=1e-10, atol=1e-12)


def test_tokens_are_the_sequences_tokens_however_forwarded():
    """tokens/s counts the chosen and rejected sequences' tokens (prompt twice) in every mode, so rates compare."""
    ex = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5, 6]}, {"prompt_ids": [7], "chosen_ids": [8, 9], "rejected_ids": [10]}]
    for by_length, padding_free, share in ((False, False, False), (True, False, False), (False, True, False), (False, True, True)):
        assert pair_batch(ex, 0, by_length, CPU, padding_free, share)["tokens"].item() == (3 + 1) + (3 + 2) + (1 + 2) + (1 + 1)


def test_share_prompt_setting():
    """null: on with padding-free rows unless the model runs flash-attention; true there, or with
    padding_free: false, is a config error naming the key."""
    from types import SimpleNamespace

    from hhdpo.core.config import ConfigError, load_config
    from hhdpo.training.packed_attention import resolve_share_prompt

    sdpa, flash = (SimpleNamespace(config=SimpleNamespace(_attn_implementation=a)) for a in ("sdpa", "flash_attention_2"))
    assert resolve_share_prompt(None, True, sdpa) and not resolve_share_prompt(None, False, sdpa)
    assert not resolve_share_prompt(None, True, flash) and not resolve_share_prompt(False, True, sdpa)
    with pytest.raises(ConfigError, match="dpo_training.share_prompt: true"):
        resolve_share_prompt(True, True, flash)
    with pytest.raises(ConfigError, match="dpo_training.share_prompt"):
        load_config(CFG, ["dpo_training.share_prompt=true", "dpo_training.padding_free=false"])


def test_unsupported_attention_is_refused(tiny_llama_dir, hh_file):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    with pytest.raises(RuntimeError, match="padding_free: false"):
        response_logps(model, pair_batch(hh_examples(hh_file, tiny_llama_dir, 1), 0, False, CPU, True), False)


def _fsdp_worker(rank, world, port, model_dir, examples, out):
    import torch.distributed as dist

    from hhdpo.core.config import Config
    from hhdpo.training.runtime import build_model

    _init(rank, world, port)
    cfg = Config()
    cfg.dpo_training.activation_checkpointing = True
    model, _, _ = build_model(cfg, str(model_dir), True, CPU, torch.float32, world, True)
    for share in (False, True):
        c, r, losses, grads = logps_and_grads(model, examples, True, chunk=9, share_prompt=share)
        grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        torch.save({"c": c, "r": r, "losses": losses, "grads": grads}, out / f"rank{rank}{'-shared' if share else ''}.pt")
    dist.destroy_process_group()


def test_packed_and_chunked_under_fsdp2_match_unwrapped_padded(tmp_path, hh_file, tiny_llama_dir):
    """2 gloo ranks, FSDP2 with activation checkpointing, each rank the same packed micro-batch (and
    then shared-prompt row) with the chunked head: the (averaged) sharded gradients equal one
    unwrapped padded forward's."""
    examples = hh_examples(hh_file, tiny_llama_dir, 3)
    _spawn(_fsdp_worker, tiny_llama_dir, examples, tmp_path)
    c, r, losses, grads = logps_and_grads(load(tiny_llama_dir), examples, False)
    for name in ("rank0", "rank1", "rank0-shared", "rank1-shared"):
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        torch.testing.assert_close(got["c"], c, rtol=1e-5, atol=0)
        torch.testing.assert_close(got["r"], r, rtol=1e-5, atol=0)
        torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=0)
        assert_grads_close(got["grads"], grads)


def test_training_with_and_without_padding_free_logs_the_same_losses(tmp_path, hh_file, tiny_llama_dir):
    """``hhdpo train``: padded full-head forwards against packed rows with a 16-token chunked head on FSDP2
    (one rank), and against shared-prompt rows: the same losses, from ln 2 at step 1."""
    runs = {}
    common = {"dpo_training.batch_size": 2, "dpo_training.max_steps": 3, "dpo_training.learning_rate": 1e-3,
              "dpo_training.lr_scheduler": "constant", "dpo_training.warmup_steps": 0}
    variants = {"padded": {"dpo_training.padding_free": "false", "dpo_training.logits_chunk_tokens": 0},
                "packed": {"dpo_training.padding_free": "true", "dpo_training.share_prompt": "false",
                           "dpo_training.logits_chunk_tokens": 16, "dpo_training.fsdp": "true"},
                "shared": {"dpo_training.share_prompt": "true"}}
    for name, extra in variants.items():
        save = tmp_path / name
        r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **common, **extra),
                    f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [m for m in read_jsonl(save / "metrics.jsonl") if "loss" in m]
    a = runs["padded"]
    assert a[0]["loss"] == pytest.approx(math.log(2), rel=1e-6) and len({m["loss"] for m in a}) == 3
    for b in (runs["packed"], runs["shared"]):
        assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-5), key


def test_a_sequence_longer_than_a_sliding_window_is_refused_in_both_layouts():
    """Packed attention has no sliding window: a longer sequence (prompt+rejected: 6 tokens; packed rows of 4 and 3) is an error."""
    from types import SimpleNamespace

    from hhdpo.data.packing import pack_rows, pack_shared_prompt
    from hhdpo.training.packed_attention import SHARED, _packed_attention

    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, config=SimpleNamespace(_attn_implementation="hhdpo_packed:sdpa"))
    q = torch.zeros(1, 2, 7, 4)
    shared = pack_shared_prompt([{"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5, 6, 7]}])
    packed = pack_rows([([1] * 4, [-100] * 4), ([2] * 3, [-100] * 3)])
    for kw in ({SHARED: shared["bounds"]}, {"cu_seq_lens_q": packed["cu_seqlens"]}):
        _packed_attention(module, q, q, q, None, sliding_window=6, **kw)  # within the window: runs
        with pytest.raises(RuntimeError, match="no sliding window"):
            _packed_attention(module, q, q, q, None, sliding_window=3, **kw)
