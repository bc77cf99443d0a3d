"""Padding-free batches: a micro-batch's sequences packed end to end into one row (batch dim 1).

Every sequence keeps its own positions (``position_ids`` restart at 0) and attends only inside
itself; ``cu_seqlens`` (cumulative lengths, as varlen attention kernels take them) and ``seq``
(each token's sequence) say where each one lies. :func:`block_causal_mask` is the attention
pattern that makes the packed row compute exactly what the padded rows compute.

:func:`pack_shared_prompt` goes further (prefix sharing): each pair's prompt appears once, followed
by its chosen and then its rejected response, both of which attend to it. The chosen and rejected
sequences of a pair share their prompt's keys, values and hidden states (causal attention: a
prompt token never sees a response), so the forward computes the prompt once instead of twice.
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


def pack_shared_prompt(examples: list[dict]) -> dict:
    """A micro-batch of tokenized pairs as one packed row with each prompt once: prompt, chosen, rejected.

    Attention (:func:`shared_prompt_mask`): prompt and chosen tokens are one causal sequence; a
    rejected token sees its prompt and the rejected tokens before it, never the chosen ones. Its
    positions continue from the prompt, as in the row prompt+rejected. The prompt's last position
    predicts both responses' first tokens, so a position may be scored twice.

    Args:
        examples: B tokenized pairs with non-empty ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.
    Returns:
        input_ids, position_ids: (1, N) long, N = sum of prompt + chosen + rejected lengths.
        score_at, targets, score_seq: (K,) long; position ``score_at[k]`` predicts token ``targets[k]``
            of sequence ``score_seq[k]`` (chosen of pair b: b; rejected: B + b), K the response tokens.
        bounds: (3B + 1,) int32, pair b's prompt, chosen and rejected are tokens [bounds[3b], bounds[3b+1]),
            [bounds[3b+1], bounds[3b+2]) and [bounds[3b+2], bounds[3b+3]).
    """
    if not examples:
        raise ValueError("pack_shared_prompt: needs at least one pair")
    ids, pos, at, targets, seq, bounds = [], [], [], [], [], [0]
    for b, ex in enumerate(examples):
        p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
        if not (p and c and r):
            raise ValueError(f"pack_shared_prompt: pair {b} has an empty prompt or response")
        s, n_p, n_c, n_r = len(ids), len(p), len(c), len(r)
        ids += p + c + r
        pos += [*range(n_p + n_c), *range(n_p, n_p + n_r)]
        at += [*range(s + n_p - 1, s + n_p + n_c - 1), s + n_p - 1, *range(s + n_p + n_c, s + n_p + n_c + n_r - 1)]
        targets += c + r
        seq += [b] * n_c + [len(examples) + b] * n_r
        bounds += [s + n_p, s + n_p + n_c, s + n_p + n_c + n_r]
    long = {"dtype": torch.long}
    return {"input_ids": torch.tensor(ids, **long)[None], "position_ids": torch.tensor(pos, **long)[None],
            "score_at": torch.tensor(at, **long), "targets": torch.tensor(targets, **long),
            "score_seq": torch.tensor(seq, **long), "bounds": torch.tensor(bounds, dtype=torch.int32)}


def pair_bounds(bounds: list[int]) -> list[tuple[int, int, int, int]]:
    """A :func:`pack_shared_prompt` row's ``bounds`` (as a list) per pair: (start, prompt end, chosen end, rejected end)."""
    return list(zip(bounds[0:-1:3], bounds[1::3], bounds[2::3], bounds[3::3], strict=True))


def shared_prompt_mask(bounds: list[int]) -> torch.Tensor:
    """Boolean attention mask of a :func:`pack_shared_prompt` row (``bounds`` as a list), True where
    query t may see key u: the pattern its attention computes without materializing it.

    Returns:
        (1, 1, N, N) bool.
    """
    n = bounds[-1]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for s, p, c, r in pair_bounds(bounds):
        mask[s:c, s:c] = torch.ones(c - s, c - s, dtype=torch.bool).tril()  # prompt + chosen
        mask[c:r, s:p] = True  # rejected sees the prompt
        mask[c:r, c:r] = torch.ones(r - c, r - c, dtype=torch.bool).tril()
    return mask[None, None]
