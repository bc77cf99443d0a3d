import math

import pytest
import torch

from hhdpo.training.loss import (
    implicit_margins,
    packed_sequence_logps,
    preference_loss,
    scored_positions,
    sequence_logps,
    token_logps,
)

# policy/reference log-probs of two pairs; h = (pc - pr) - (rc - rr) = [2.0, -1.0]
PC, PR = torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0])
RC, RR = torch.tensor([-11.0, -12.0]), torch.tensor([-13.0, -12.0])
H = [2.0, -1.0]


def ls(x):  # log sigmoid by hand
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("kind, eps, expected", [
    ("sigmoid", 0.0, lambda h, b: -ls(b * h)),
    ("sigmoid", 0.1, lambda h, b: -0.9 * ls(b * h) - 0.1 * ls(-b * h)),
    ("robust", 0.1, lambda h, b: (-0.9 * ls(b * h) + 0.1 * ls(-b * h)) / 0.8),
    ("hinge", 0.0, lambda h, b: max(0.0, 1 - b * h)),
    ("ipo", 0.0, lambda h, b: (h - 1 / (2 * b)) ** 2),
])
def test_losses_match_hand_computation(kind, eps, expected):
    beta = 0.5
    losses, cr, rj = preference_loss(PC, PR, RC, RR, beta, kind, eps)
    assert losses.tolist() == pytest.approx([expected(h, beta) for h in H], rel=1e-6)
    assert cr.tolist() == pytest.approx([0.5 * 1.0, 0.0])  # beta * (pc - rc)
    assert rj.tolist() == pytest.approx([0.5 * -1.0, 0.5 * 1.0])


def test_reference_free_and_margins():
    losses, cr, rj = preference_loss(PC, PR, RC, RR, 1.0, reference_free=True)
    assert losses.tolist() == pytest.approx([-ls(4.0), -ls(-1.0)], rel=1e-6)
    assert cr.tolist() == PC.tolist()
    assert implicit_margins(PC, PR, RC, RR).tolist() == H
    assert preference_loss(PC, PR, RC, RR, 1.0)[0][0].item() == pytest.approx(-ls(2.0))


def test_sigmoid_at_zero_margin_is_ln2():
    z = torch.zeros(3)
    assert preference_loss(z, z, z, z, 0.1)[0].tolist() == pytest.approx([math.log(2)] * 3)


def test_sequence_logps_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 5]])
    lsm = logits.log_softmax(-1)
    want0 = lsm[0, 1, 3] + lsm[0, 2, 4]
    want1 = lsm[1, 0, 1] + lsm[1, 1, 2] + lsm[1, 2, 6] + lsm[1, 3, 5]
    got = sequence_logps(logits, labels)
    assert got.tolist() == pytest.approx([want0.item(), want1.item()], rel=1e-6)
    avg = sequence_logps(logits, labels, average=True)
    assert avg.tolist() == pytest.approx([want0.item() / 2, want1.item() / 4], rel=1e-6)


def test_packed_sequence_logps_equals_padded():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 9, -100], [-100, 1, 2, 6, 5, 0], [-100, -100, -100, -100, 7, -100]])
    at = scored_positions(labels)
    assert at.sum() == (labels != -100).sum() and not at[:, -1].any()
    flat = token_logps(logits[at], labels[:, 1:][at[:, :-1]])
    rows = torch.arange(3)[:, None].expand_as(at)[at]
    for average in (False, True):
        torch.testing.assert_close(packed_sequence_logps(flat, rows, 3, average), sequence_logps(logits, labels, average))


def test_lm_head_only_at_scored_positions_gives_same_logps(tiny_llama_dir):
    """The trainer projects to the vocabulary only where a response token is predicted; same log-probs and gradients."""
    from transformers import AutoModelForCausalLM

    from hhdpo.core.models import lm_head_only_at

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[0, :7] = -100
    labels[1, :5] = -100
    labels[1, 10:] = -100
    full = sequence_logps(model(input_ids=ids).logits, labels)
    g_full = torch.autograd.grad(full.sum(), model.model.layers[0].mlp.up_proj.weight)[0]
    at = scored_positions(labels)
    with lm_head_only_at(model, at):
        logits = model(input_ids=ids).logits
    assert logits.shape == (int(at.sum()), model.config.vocab_size)
    part = packed_sequence_logps(token_logps(logits, labels[:, 1:][at[:, :-1]]), torch.arange(2)[:, None].expand_as(at)[at], 2)
    torch.testing.assert_close(full, part, rtol=1e-5, atol=1e-5)
    g_part = torch.autograd.grad(part.sum(), model.model.layers[0].mlp.up_proj.weight)[0]
    torch.testing.assert_close(g_full, g_part, rtol=1e-4, atol=1e-6)
    assert model(input_ids=ids).logits.shape == (2, 12, model.config.vocab_size)  # hook removed on exit
