"""Every loss type against TRL's own DPO loss on the same log-probs of real HH pairs.

The log-probs come from SmolLM2 (the reference) and a perturbed copy of it (the policy) on
real pairs; our side goes through the trainer's own forward (``hhdpo.training.forward.response_logps``)
with the log-prob averaging the config resolves for that loss type, TRL's side gets the
per-token log-probs through a stub model and runs ``trl.DPOTrainer._compute_loss`` (TRL 1.x
has no standalone ``dpo_loss``). Where we differ from TRL on purpose, the test asserts the
documented difference.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from hhdpo.core.config import DatasetConfig, load_config
from hhdpo.core.models import load_model, load_tokenizer
from hhdpo.data.hh import load_pairs, tokenize_pairs
from hhdpo.training.forward import pair_batch, response_logps
from hhdpo.training.loss import preference_loss

BETA = 0.1
N_PAIRS = 4


def _per_token_logps(model, g: dict) -> torch.Tensor:
    """(2n, T-1) log-probs of each next token, 0 where it is not a response token (TRL's fused-head output)."""
    with torch.no_grad():
        logits = model(input_ids=g["input_ids"], attention_mask=g["attention_mask"]).logits[:, :-1].float()
    labels = g["labels"][:, 1:]
    mask = labels != -100
    return logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask


@pytest.fixture(scope="module")
def logps(hh_file, smollm2_dir):
    pairs, _ = load_pairs(str(hh_file), f"test[:{N_PAIRS}]", log=None)
    tok = load_tokenizer(str(smollm2_dir))
    examples = tokenize_pairs(pairs, tok, DatasetConfig(max_len=64, max_prompt_len=40))
    batch = pair_batch(examples, tok.pad_token_id, False, torch.device("cpu"))
    (g,) = batch["groups"]
    lengths = (g["labels"][:, 1:] != -100).sum(1).float()
    model = load_model(str(smollm2_dir))
    model.eval()
    out = {"batch": batch, "group": g}
    for who in ("ref", "policy"):
        if who == "policy":  # a policy some way from the reference: rescale the final norm's channels
            torch.manual_seed(0)
            with torch.no_grad():
                model.model.norm.weight.mul_(1 + 0.3 * torch.randn_like(model.model.norm.weight))
        out[f"{who}_tok"] = _per_token_logps(model, g)
        with torch.no_grad():
            summed = response_logps(model, batch, average=False)
        out[who, False] = summed
        # averaged = summed / response length (packed_sequence_logps' average is tested in test_loss)
        out[who, True] = (summed[0] / lengths[:batch["n"]], summed[1] / lengths[batch["n"]:])
    return out


def _trl(lp: dict, loss_type: str, eps: float = 0.0, reference_free: bool = False, swap: bool = False):
    """TRL's mean loss and logged metrics on the same per-token log-probs (``swap``: chosen <-> rejected)."""
    from trl import DPOTrainer

    g, n = lp["group"], lp["batch"]["n"]
    order = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]) if swap else torch.arange(2 * n)
    policy_tok, ref_tok = lp["policy_tok"][order], lp["ref_tok"][order]
    completion = torch.cat([torch.zeros_like(g["labels"][:, :1]), (g["labels"][:, 1:] != -100).long()], 1)[order]
    ref = torch.zeros(2 * n) if reference_free else ref_tok.sum(1)
    zeros = torch.zeros_like(policy_tok)

    def model(**_):
        return SimpleNamespace(log_probs=policy_tok, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=BETA, label_smoothing=eps,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x))
    inputs = {"input_ids": g["input_ids"][order], "attention_mask": g["attention_mask"][order],
              "completion_mask": completion, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss.item(), {k: v[0] for k, v in stub._metrics["train"].items()}


def _ours(lp: dict, loss_type: str, eps: float = 0.0, reference_free: bool = False):
    cfg = load_config(None, [f"dpo_training.loss_type={loss_type}"]).dpo_training
    avg = cfg.average_log_prob  # what a run with this loss type uses by default
    pc, pr = lp["policy", avg]
    rc, rr = lp["ref", avg]
    losses, cr, rj = preference_loss(pc, pr, rc, rr, BETA, loss_type, eps, reference_free)
    return losses, cr, rj, avg


def test_our_log_probs_are_trls_per_token_sums(logps):
    n = logps["batch"]["n"]
    for who in ("policy", "ref"):
        summed = logps[f"{who}_tok"].sum(1)
        torch.testing.assert_close(torch.cat(logps[who, False]), summed, rtol=1e-5, atol=1e-4)
    # the pairs are far enough apart for the losses to be told apart
    h = (logps["policy", False][0] - logps["policy", False][1]) - (logps["ref", False][0] - logps["ref", False][1])
    assert h.abs().max() > 1.0 and h.numel() == n


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("robust", 0.1), ("hinge", 0.0)])
def test_summed_losses_match_trl(logps, loss_type, eps):
    losses, cr, rj, avg = _ours(logps, loss_type, eps)
    assert avg is False
    want, metrics = _trl(logps, loss_type, eps)
    assert losses.mean().item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-4, abs=1e-6)
    assert rj.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-4, abs=1e-6)
    assert (cr > rj).float().mean().item() == pytest.approx(metrics["rewards/accuracies"])


def test_reference_free_is_trl_with_zero_reference(logps):
    losses, cr, _, _ = _ours(logps, "sigmoid", reference_free=True)
    want, metrics = _trl(logps, "sigmoid", reference_free=True)
    assert losses.mean().item() == pytest.approx(want, rel=1e-4)
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-4)
    assert want != pytest.approx(_trl(logps, "sigmoid")[0], rel=1e-3)  # the reference really mattered


def test_ipo_defaults_to_averaged_log_probs_and_matches_trl(logps):
    """TRL normalises IPO's log-ratios by response length (the IPO authors' setup); a config with
    loss_type ipo averages log-probs by default, which is the same loss. Our rewards are then on
    averaged log-probs too: TRL's summed rewards are ours times the response length."""
    losses, cr, rj, avg = _ours(logps, "ipo")
    assert avg is True
    want, metrics = _trl(logps, "ipo")
    assert losses.mean().item() == pytest.approx(want, rel=1e-4)
    n, labels = logps["batch"]["n"], logps["group"]["labels"]
    lengths = (labels[:, 1:] != -100).sum(1).float()
    assert (cr * lengths[:n]).mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-4)
    assert (rj * lengths[n:]).mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-4)
    # on summed log-probs (the old default) IPO is another, clipping-dominated loss
    pc, pr = logps["policy", False]
    rc, rr = logps["ref", False]
    summed = preference_loss(pc, pr, rc, rr, BETA, "ipo")[0].mean().item()
    assert summed != pytest.approx(want, rel=0.1)


def test_cdpo_is_the_label_smoothed_mixture_of_trls_sigmoid_loss(logps):
    """TRL 1.x's sigmoid loss ignores label_smoothing (cDPO was dropped); ours is conservative DPO:
    (1 - eps) x the loss of the pair + eps x the loss of the pair with chosen and rejected swapped."""
    eps = 0.1
    losses, *_ = _ours(logps, "sigmoid", eps)
    plain, swapped = _trl(logps, "sigmoid")[0], _trl(logps, "sigmoid", swap=True)[0]
    assert losses.mean().item() == pytest.approx((1 - eps) * plain + eps * swapped, rel=1e-4)
    assert _trl(logps, "sigmoid", eps)[0] == pytest.approx(plain)  # TRL: label_smoothing has no effect
    assert losses.mean().item() != pytest.approx(plain, rel=1e-3)
