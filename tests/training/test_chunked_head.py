"""The LM head in chunks (hhdpo.training.chunked_head): the same log-probs and gradients as the
full [tokens, vocab] logits, chunks smaller than and uneven with the scored tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hhdpo.training.chunked_head import chunked_token_logps
from hhdpo.training.forward import pair_batch, response_logps
from tests.training.test_padding_free import (
    CPU,
    assert_grads_close,
    hh_examples,
    load,
    logps_and_grads,
)


def _full(hidden, weight, bias, targets):
    """log_softmax of the whole logits, gathered: written out here, not via the code under test."""
    return F.log_softmax(F.linear(hidden, weight, bias).double(), dim=-1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_logps_and_grads_equal_the_full_head(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk)
    n, h, v = 23, 8, 50
    leaves = [torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)]
    leaves += [torch.randn(v, generator=g, dtype=torch.float64)] if with_bias else []
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)  # uneven weights per token

    def run(fn):
        xs = [x.clone().requires_grad_() for x in leaves]
        out = fn(xs[0], xs[1], xs[2] if with_bias else None, targets)
        (out.double() * upstream).sum().backward()
        return out.detach().double(), [x.grad for x in xs]

    want, want_grads = run(_full)
    got, got_grads = run(lambda hs, w, b, t: chunked_token_logps(hs, w, b, t, chunk))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the forward's log-probs are fp32
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        chunked_token_logps(leaves[0], leaves[1], None, targets, 0)


@pytest.mark.parametrize("padding_free", [False, True])
def test_model_chunked_head_equals_full_head(hh_file, tiny_llama_dir, padding_free):
    """Tiny Llama (tied embeddings: the head's gradient joins the embedding's), 3 HH pairs: chunks of
    16 and of 64 tokens (neither divides the scored tokens) and one chunk of all, against the full head."""
    examples = hh_examples(hh_file, tiny_llama_dir, 3)
    model = load(tiny_llama_dir)
    c, r, losses, grads = logps_and_grads(model, examples, padding_free, chunk=0)
    for chunk in (16, 64, 100000):
        cc, rc, lc, gc = logps_and_grads(model, examples, padding_free, chunk=chunk)
        torch.testing.assert_close(cc, c, rtol=1e-5, atol=0)
        torch.testing.assert_close(rc, r, rtol=1e-5, atol=0)
        torch.testing.assert_close(lc, losses, rtol=1e-5, atol=0)
        assert_grads_close(gc, grads)
    assert not model.lm_head.__dict__.get("forward"), "the head's own forward is back after the block"


def test_head_output_transformed_by_the_model_is_refused(hh_file, tiny_llama_dir):
    """Gemma 2 soft-caps its logits after the head: the chunked log-probs would be wrong, so it is refused
    (the full head, where the soft-capping runs on the logits, still works)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    examples = hh_examples(hh_file, tiny_llama_dir, 1)
    cfg = Gemma2Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(cfg)
    batch = pair_batch(examples, 0, False, CPU)
    with pytest.raises(RuntimeError, match="logits_chunk_tokens: 0"):
        response_logps(model, batch, False, 8)
    c, r = response_logps(model, batch, False, 0)
    assert torch.isfinite(c).all() and torch.isfinite(r).all()
