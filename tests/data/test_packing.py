"""Padding-free packing (hhdpo.data.packing) on a hand-worked example."""

from __future__ import annotations

import pytest
import torch

from hhdpo.data.packing import block_causal_mask, pack_pairs, pack_rows, pack_shared_prompt, shared_prompt_mask


def test_pack_rows_by_hand():
    # the second sequence's first token is a response token: its label must not be scored from the first sequence
    rows = [([11, 12, 13], [-100, 12, 13]), ([21, 22], [21, 22]), ([31], [-100])]
    p = pack_rows(rows)
    assert p["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31]]
    assert p["labels"].tolist() == [[-100, 12, 13, -100, 22, -100]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert p["seq"].tolist() == [[0, 0, 0, 1, 1, 2]]
    assert p["cu_seqlens"].tolist() == [0, 3, 5, 6] and p["cu_seqlens"].dtype == torch.int32
    assert p["max_seqlen"] == 3
    with pytest.raises(ValueError):
        pack_rows([([1], [-100]), ([], [])])


def test_pack_pairs_orders_chosen_then_rejected():
    ex = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
          {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]}]
    p = pack_pairs(ex)
    assert p["input_ids"].tolist() == [[1, 2, 3, 6, 7, 8, 1, 2, 4, 5, 6, 9]]
    assert p["labels"].tolist() == [[-100, -100, 3, -100, 7, 8, -100, -100, 4, 5, -100, 9]]
    assert p["seq"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]]


def test_block_causal_mask_by_hand():
    m = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    assert m.shape == (1, 1, 5, 5) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0],
                                      [0, 0, 1, 0, 0],
                                      [0, 0, 1, 1, 0],
                                      [0, 0, 1, 1, 1]]


def test_pack_shared_prompt_by_hand():
    # pair 0: prompt [1, 2], chosen [3], rejected [4, 5]; pair 1: prompt [6], chosen [7, 8], rejected [9]
    ex = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
          {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]}]
    p = pack_shared_prompt(ex)
    assert p["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]  # rejected continues from its prompt
    # the prompt's last token (index 1, 5) predicts both first tokens
    assert p["score_at"].tolist() == [1, 1, 3, 5, 6, 5]
    assert p["targets"].tolist() == [3, 4, 5, 7, 8, 9]
    assert p["score_seq"].tolist() == [0, 2, 2, 1, 1, 3]  # chosen b -> b, rejected b -> 2 + b
    assert p["bounds"].tolist() == [0, 2, 3, 5, 6, 8, 9] and p["bounds"].dtype == torch.int32
    with pytest.raises(ValueError, match="pair 0"):
        pack_shared_prompt([{"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]}])


def test_shared_prompt_mask_by_hand():
    m = shared_prompt_mask([0, 2, 3, 5])  # prompt 0-1, chosen 2, rejected 3-4
    assert m.shape == (1, 1, 5, 5)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0],
                                      [1, 1, 1, 0, 0],
                                      [1, 1, 0, 1, 0],
                                      [1, 1, 0, 1, 1]]
