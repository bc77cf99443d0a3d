"""Token-budget forwards (hhdpo.data.token_budget): the budget holds, every pair is forwarded
once, a pair over the budget is alone, and every rank runs as many forwards."""

from __future__ import annotations

import random

import pytest

from hhdpo.data.token_budget import first_fit, pair_tokens, plan_forwards, split_to


def test_pair_tokens_counts_both_rows_without_padding():
    ex = {"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5, 6]}
    assert pair_tokens(ex) == 9  # prompt+chosen (4) + prompt+rejected (5)
    assert pair_tokens(ex, shared_prompt=True) == 6  # prompt, chosen, rejected: the shared-prompt row's length


def test_first_fit_decreasing_packs_long_with_short():
    # in order, [30], [70, 30], [70] would take 3 forwards; longest first fills both exactly
    assert first_fit([30, 70, 30, 70], 100) == [[0, 1], [2, 3]]
    assert first_fit([60, 40, 50, 50], 100) == [[0, 1], [2, 3]]


def test_a_pair_over_the_budget_is_alone():
    assert first_fit([50, 300, 40], 100) == [[1], [0, 2]]
    assert first_fit([300, 300], 100) == [[0], [1]]


def test_ranks_with_fewer_forwards_split_their_fullest():
    plans = plan_forwards([[90, 90, 90, 90], [10, 10, 10, 10]], 100)
    assert plans == [[[0], [1], [2], [3]], [[0], [1], [2], [3]]]
    # rank 1 packs into one forward of 100 tokens, then halves it until it has rank 0's 2 forwards
    plans = plan_forwards([[60, 60, 40, 40], [50, 10, 10, 30]], 100)
    assert plans == [[[0, 2], [1, 3]], [[0, 1], [2, 3]]]


def test_split_to_halves_the_forward_with_most_tokens():
    assert split_to([[0, 1], [2, 3, 4, 5]], [9, 9, 1, 1, 1, 1], 3) == [[0], [1], [2, 3, 4, 5]]
    assert split_to([[0, 1], [2, 3, 4, 5]], [1, 1, 9, 9, 1, 1], 3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="into 4"):
        split_to([[0, 1], [2]], [1, 1, 1], 4)


@pytest.mark.parametrize("seed", range(20))
def test_random_plans_keep_every_promise(seed):
    rng = random.Random(seed)
    world, pairs, budget = rng.randint(1, 6), rng.randint(1, 24), rng.choice([64, 200, 700])
    tokens = [[rng.randint(10, 400) for _ in range(pairs)] for _ in range(world)]
    plans = plan_forwards(tokens, budget)
    assert len({len(p) for p in plans}) == 1  # as many forwards on every rank
    for plan, tok in zip(plans, tokens):
        assert sorted(p for fw in plan for p in fw) == list(range(pairs))  # every pair once
        for fw in plan:
            assert fw and (sum(tok[p] for p in fw) <= budget or len(fw) == 1)
    # the count is the most any rank needs on its own, not more
    assert len(plans[0]) == max(len(first_fit(t, budget)) for t in tokens)
