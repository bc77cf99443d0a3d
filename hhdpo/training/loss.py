"""DPO-family losses and sequence log-probabilities, as pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, computed in fp32 (bf16 logits lose the small differences DPO needs).

    Args:
        logits: (..., V) next-token logits.
        targets: (...) token ids.
    Returns:
        (...) float32 log-probabilities.
    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose next token is scored (labels[t + 1] != -100); the last position never is."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of the log-probabilities of the labelled tokens of each sequence.

    Args:
        logits: (B, T, V) next-token logits; position t predicts token t+1.
        labels: (B, T) token ids, -100 where a token is not scored (prompt, padding).
        average: return the mean over scored tokens instead of the sum (length-normalised).
    Returns:
        (B,) float32 log pi(y | x).
    """
    labels = labels[:, 1:]
    mask = labels != -100
    total = (token_logps(logits[:, :-1, :], labels.masked_fill(~mask, 0)) * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def packed_sequence_logps(logps: torch.Tensor, rows: torch.Tensor, n_rows: int, average: bool = False) -> torch.Tensor:
    """Per-sequence sum (or mean) of token log-probs given as one flat vector.

    The flat form is what the trainer gets when the LM head runs only at scored positions:
    ``logps[k]`` belongs to sequence ``rows[k]``. Equal to :func:`sequence_logps` on the
    padded (B, T, V) logits of the same tokens.

    Args:
        logps: (N,) token log-probs (:func:`token_logps`).
        rows: (N,) long, the sequence each token belongs to, in [0, n_rows).
        n_rows: number of sequences B.
        average: mean over each sequence's scored tokens instead of the sum.
    Returns:
        (B,) float32.
    """
    total = logps.new_zeros(n_rows).index_add(0, rows, logps)
    if average:
        return total / torch.bincount(rows, minlength=n_rows).clamp(min=1).to(total.dtype)
    return total


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference loss and implicit rewards.

    With h = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x))
    (the reference terms are 0 when ``reference_free``) and eps = ``label_smoothing``:

    - ``sigmoid`` (DPO, Rafailov et al. 2023, eq. 7; with eps > 0 the conservative cDPO of
      Mitchell 2023): L = -(1 - eps) log s(beta h) - eps log s(-beta h). TRL 1.x's sigmoid
      loss has no label smoothing; ours is its loss mixed with that of the swapped pair.
    - ``robust`` (Chowdhury et al. 2024, "Provably Robust DPO", eq. 5):
      L = ((1 - eps) (-log s(beta h)) - eps (-log s(-beta h))) / (1 - 2 eps)
    - ``hinge`` (SLiC, Zhao et al. 2023): L = max(0, 1 - beta h)
    - ``ipo`` (Azar et al. 2023, eq. 17): L = (h - 1 / (2 beta))^2, meant for length-averaged
      log-probs (``dpo_training.average_log_prob`` defaults to that for ipo; TRL divides the
      log-ratios by the response lengths, the same loss). On summed log-probs h is tens to
      hundreds against a target of 1 / (2 beta).

    Each matches TRL's loss of the same name on the same log-probs (``tests/training/test_loss_vs_trl.py``);
    the rewards are on the log-probs given, so averaged ones for ipo by default.

    Args:
        policy_*_logps: (B,) log-probs of chosen/rejected responses under the policy.
        reference_*_logps: (B,) the same under the frozen reference model.
        beta: KL-penalty temperature.
        loss_type: one of :data:`LOSS_TYPES`.
        label_smoothing: assumed probability that a preference label is flipped.
        reference_free: ignore the reference model (implicit uniform reference).
    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,); rewards are
        beta * (log pi - log pi_ref), detached.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0.0 if reference_free else reference_chosen_logps - reference_rejected_logps
    h = pi_logratios - ref_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    ref_c = 0.0 if reference_free else reference_chosen_logps
    ref_r = 0.0 if reference_free else reference_rejected_logps
    chosen_rewards = beta * (policy_chosen_logps - ref_c).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_r).detach()
    return losses, chosen_rewards, rejected_rewards


def implicit_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps) -> torch.Tensor:
    """M = (log pi(c) - log pi(r)) - (log pi_ref(c) - log pi_ref(r)), detached: the tail test's input."""
    return ((policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)).detach()
