"""One micro-batch of pairs through a causal LM: padded tensors in, per-response log-probs out.

The trainer runs this for the policy (with gradients), the live reference and the
precomputed reference alike, so all three score the same tokens with the same arithmetic.
"""

from __future__ import annotations

import torch

from hhdpo.core.models import lm_head_only_at
from hhdpo.data.batching import collate_groups
from hhdpo.training.loss import packed_sequence_logps, scored_positions, token_logps


def pair_batch(examples: list[dict], pad_id: int, by_length: bool, device: torch.device) -> dict:
    """``examples`` (tokenized pairs) as forward groups on ``device`` (:func:`hhdpo.data.batching.collate_groups`),
    with the pair count ``n`` and the number of real (unpadded) tokens."""
    groups = collate_groups(examples, pad_id, by_length)
    groups = [{k: v.to(device, non_blocking=True) for k, v in g.items()} for g in groups]
    return {"groups": groups, "n": len(examples), "tokens": sum(g["attention_mask"].sum() for g in groups)}


def response_logps(model, batch: dict, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or length-averaged) response log-probs of the chosen and rejected rows of ``batch``.

    The LM head projects only the positions that predict a response token; the model computes
    in its parameters' dtype (FSDP2's mixed precision casts them). Returns (n,) float32 chosen and rejected log-probs.
    """
    logps, rows = [], []
    for g in batch["groups"]:
        at = scored_positions(g["labels"])
        with lm_head_only_at(model, at):
            logits = model(input_ids=g["input_ids"], attention_mask=g["attention_mask"], use_cache=False).logits
        if logits.dim() != 2:
            raise RuntimeError(f"{type(model).__name__} does not call its output embedding on the hidden states; "
                               "the response-only LM head cannot be used with it")
        logps.append(token_logps(logits, g["labels"][:, 1:][at[:, :-1]]))
        rows.append(g["rows"][:, None].expand_as(at)[at])
    n = batch["n"]
    lp = packed_sequence_logps(torch.cat(logps), torch.cat(rows), 2 * n, average)
    return lp[:n], lp[n:]
