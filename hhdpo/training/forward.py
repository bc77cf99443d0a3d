"""One micro-batch of pairs through a causal LM: token ids in, per-response log-probs out.

The trainer runs this for the policy (with gradients), the live reference and the
precomputed reference alike, so all three score the same tokens with the same arithmetic.
A micro-batch is forwarded as padded rows (:func:`hhdpo.data.batching.collate_groups`) or
padding-free, as one packed row (:mod:`hhdpo.data.packing`, :mod:`hhdpo.training.packed_attention`),
optionally with each pair's prompt once (``share_prompt``).
"""

from __future__ import annotations

import contextlib

import torch

from hhdpo.core.models import lm_head_only_at
from hhdpo.data.batching import collate_groups
from hhdpo.data.packing import pack_pairs, pack_shared_prompt
from hhdpo.data.token_budget import pair_tokens
from hhdpo.training.chunked_head import check_head_output, lm_head_logps_at
from hhdpo.training.loss import packed_sequence_logps, scored_positions, token_logps
from hhdpo.training.packed_attention import packed_forward, packed_kwargs


def pair_batch(examples: list[dict], pad_id: int, by_length: bool, device: torch.device,
               padding_free: bool = False, share_prompt: bool = False) -> dict:
    """``examples`` (tokenized pairs) as forward groups on ``device``, with the pair count ``n`` and
    ``tokens``, the real tokens of their chosen and rejected sequences (however they are forwarded):
    padded groups (:func:`hhdpo.data.batching.collate_groups`, ``by_length``), or with ``padding_free``
    one packed row (:func:`hhdpo.data.packing.pack_pairs`; ``share_prompt``: ``pack_shared_prompt``)."""
    if share_prompt:
        groups = [pack_shared_prompt(examples)]
    else:
        groups = [pack_pairs(examples)] if padding_free else collate_groups(examples, pad_id, by_length)
    # a shared-prompt row's bounds stay on the host: every attention call reads them (a GPU copy would sync each layer)
    groups = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "bounds" else v for k, v in g.items()}
              for g in groups]
    tokens = torch.tensor(float(sum(pair_tokens(ex) for ex in examples)), device=device)
    return {"groups": groups, "n": len(examples), "tokens": tokens}


def _scored_logps(model, g: dict, at: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """(N,) float32 log-probs of ``targets``, the tokens that the positions ``at`` (a bool mask, or
    row and column indices) predict.

    The LM head projects only those positions; with ``chunk_tokens`` it does so that many at a
    time (:mod:`hhdpo.training.chunked_head`), else all at once and the log-softmax follows."""
    packed = "position_ids" in g
    inputs = packed_kwargs(g) if packed else {"input_ids": g["input_ids"], "attention_mask": g["attention_mask"]}
    with packed_forward(model, "bounds" in g) if packed else contextlib.nullcontext():
        if chunk_tokens:
            with lm_head_logps_at(model, at, targets, chunk_tokens) as seen:
                out = model(**inputs, use_cache=False).logits
            return check_head_output(model, out, seen)
        with lm_head_only_at(model, at):
            logits = model(**inputs, use_cache=False).logits
    if logits.dim() != 2:
        raise RuntimeError(f"{type(model).__name__} does not call its output embedding on the hidden states; "
                           "the response-only LM head cannot be used with it")
    return token_logps(logits, targets)


def response_logps(model, batch: dict, average: bool, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or length-averaged) response log-probs of the chosen and rejected rows of ``batch``.

    The model computes in its parameters' dtype (FSDP2's mixed precision casts them);
    ``chunk_tokens`` > 0 bounds the LM head's logits to that many tokens at once.
    Returns (n,) float32 chosen and rejected log-probs.
    """
    logps, rows = [], []
    for g in batch["groups"]:
        if "score_at" in g:  # a shared-prompt row: the prompt's last position scores both first tokens
            logps.append(_scored_logps(model, g, (torch.zeros_like(g["score_at"]), g["score_at"]), g["targets"], chunk_tokens))
            rows.append(g["score_seq"])
            continue
        at = scored_positions(g["labels"])
        logps.append(_scored_logps(model, g, at, g["labels"][:, 1:][at[:, :-1]], chunk_tokens))
        # each scored position's sequence: a packed row's token index, a padded row's index
        rows.append((g["seq"] if "seq" in g else g["rows"][:, None].expand_as(at))[at])
    n = batch["n"]
    lp = packed_sequence_logps(torch.cat(logps), torch.cat(rows), 2 * n, average)
    return lp[:n], lp[n:]
