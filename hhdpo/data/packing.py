"""Padding-free batches: a micro-batch's sequences packed end to end into one row (batch dim 1).

Every sequence keeps its own positions (``position_ids`` restart at 0) and attends only inside
itself; ``cu_seqlens`` (cumulative lengths, as varlen attention kernels take them) and ``seq``
(each token's sequence) say where each one lies. :func:`block_causal_mask` is the attention
pattern that makes the packed row compute exactly what the padded rows compute.
"""

from __future__ import annotations

import torch


def pair_rows(examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per sequence: rows [0, B) chosen, [B, 2B) rejected; labels -100 on the prompt.

    Args:
        examples: tokenized pairs with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.
    Returns:
        2B (ids, labels) tuples of equal-length lists.
    """
    return [(ex["prompt_ids"] + ex[key], [-100] * len(ex["prompt_ids"]) + ex[key])
            for key in ("chosen_ids", "rejected_ids") for ex in examples]


def pack_rows(rows: list[tuple[list[int], list[int]]]) -> dict:
    """``rows`` packed end to end into one row.

    Args:
        rows: (input ids, labels) per sequence, labels -100 where a token is not scored.
    Returns:
        input_ids, labels, position_ids, seq: (1, N) long, N the total length; ``labels`` is -100 at
            each sequence's first token, so no sequence's last position scores the next one's first token;
            ``seq[0, t]`` is the index in ``rows`` of the sequence holding token t.
        cu_seqlens: (S + 1,) int32, sequence s is tokens [cu_seqlens[s], cu_seqlens[s + 1]).
        max_seqlen: int, the longest sequence.
    """
    lengths = [len(ids) for ids, _ in rows]
    if not rows or min(lengths) < 1:
        raise ValueError("pack_rows: needs at least one sequence, each of at least one token")
    labels = [lab for _, l in rows for lab in [-100] + l[1:]]
    length = torch.tensor(lengths)
    starts = torch.cumsum(length, 0) - length
    seq = torch.repeat_interleave(torch.arange(len(rows)), length)
    return {
        "input_ids": torch.tensor([t for ids, _ in rows for t in ids], dtype=torch.long)[None],
        "labels": torch.tensor(labels, dtype=torch.long)[None],
        "position_ids": (torch.arange(len(seq)) - starts[seq])[None],
        "seq": seq[None],
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(length, 0)]).to(torch.int32),
        "max_seqlen": max(lengths),
    }


def pack_pairs(examples: list[dict]) -> dict:
    """A micro-batch of tokenized pairs as one packed row (:func:`pack_rows` of :func:`pair_rows`)."""
    return pack_rows(pair_rows(examples))


def block_causal_mask(seq: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask of a packed row: query t sees key u iff both are in one sequence and u <= t.

    Args:
        seq: (1, N) each token's sequence index (:func:`pack_rows`).
    Returns:
        (1, 1, N, N) bool, True where attention is allowed (``scaled_dot_product_attention``'s convention).
    """
    n = seq.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
    return (causal & (seq[0, :, None] == seq[0, None, :]))[None, None]
