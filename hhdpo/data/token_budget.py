"""Token-budget micro-batches (``dpo_training.max_tokens_per_micro_batch``): how one rank forwards
its pairs of an optimizer step, in forwards of at most a budget of tokens, as many on every rank.

What a step is does not change: :func:`hhdpo.data.batching.rank_batches` deals each rank
``batch_size x gradient_accumulation_steps`` pairs per step as without a budget, so the number of
steps, the schedule, the learning rate and the resume position stay exactly as they were; only
the split of a rank's share into forwards is re-planned. A pair counts its real (unpadded) tokens,
prompt+chosen plus prompt+rejected, which is what a padding-free batch forwards (a padded batch
forwards more; a shared-prompt row the prompt once, and so counts it once). A pair longer than the budget gets a forward of its own.

FSDP2 all-gathers the parameters in every forward and reduce-scatters in every backward, so no
rank may run fewer forwards than another. :func:`plan_forwards` plans every rank's split (each
rank computes all of them from the same dealt pairs, without communicating) and splits a rank's
forwards further until it has as many as the rank with the most. Every rank holds the same number
of pairs, and no rank has more forwards than pairs, so no empty (zero-weight) forward is needed.
"""

from __future__ import annotations


def pair_tokens(example: dict, shared_prompt: bool = False) -> int:
    """Real tokens of a tokenized pair (``prompt_ids``, ``chosen_ids``, ``rejected_ids``): its two rows,
    prompt+chosen and prompt+rejected, without padding; ``shared_prompt``: the prompt once, as a
    shared-prompt row (:func:`hhdpo.data.packing.pack_shared_prompt`) forwards it."""
    return (1 if shared_prompt else 2) * len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])


def first_fit(tokens: list[int], budget: int) -> list[list[int]]:
    """Pairs packed into forwards of at most ``budget`` tokens, first-fit decreasing.

    Args: ``tokens``: each pair's tokens; ``budget``: the most tokens a forward may hold (> 0).
    Returns: forwards as lists of positions into ``tokens`` (each position once, ascending within a
    forward), in the order they were opened. The longest pair goes first, each into the first forward
    with room (within 11/9 of the fewest forwards, + 1); a pair longer than ``budget`` is alone.
    Ties keep position order, so the plan is deterministic.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        b = next((b for b in range(len(bins)) if tokens[i] <= room[b]), None)
        if b is None:
            bins.append([i])
            room.append(budget - tokens[i])
        else:
            bins[b].append(i)
            room[b] -= tokens[i]
    return [sorted(b) for b in bins]


def split_to(forwards: list[list[int]], tokens: list[int], count: int) -> list[list[int]]:
    """``forwards`` split further until there are ``count`` of them (splitting keeps every forward
    within the budget): each time the one with the most tokens among those of two or more pairs is
    cut in two halves by pair count.

    Args: ``forwards``: lists of positions into ``tokens``; ``count``: at least ``len(forwards)``
    and at most the number of pairs. Returns: ``count`` non-empty forwards of the same positions.
    """
    out = [list(f) for f in forwards]
    if not len(out) <= count <= sum(map(len, out)):
        raise ValueError(f"cannot split {len(out)} forwards of {sum(map(len, out))} pairs into {count}")
    while len(out) < count:
        j = max((k for k in range(len(out)) if len(out[k]) > 1), key=lambda k: (sum(tokens[i] for i in out[k]), -k))
        f = out[j]
        out[j:j + 1] = [f[:len(f) // 2], f[len(f) // 2:]]
    return out


def plan_forwards(tokens_per_rank: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Every rank's forwards of one step under a token budget, as many on every rank.

    Args: ``tokens_per_rank``: for each rank, its pairs' tokens (:func:`pair_tokens`) in dealt
    order; every rank holds the same number of pairs. ``budget``: tokens per forward (> 0).
    Returns: for each rank, its forwards as lists of positions into its pairs; each position once;
    a forward exceeds ``budget`` only when it is one pair; every rank has as many forwards as
    :func:`first_fit` needs on the rank that needs the most.
    """
    plans = [first_fit(t, budget) for t in tokens_per_rank]
    count = max(len(p) for p in plans)
    return [split_to(p, t, count) for p, t in zip(plans, tokens_per_rank, strict=True)]
