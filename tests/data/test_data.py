import gzip
import json
import re

import numpy as np
import pytest
import torch

from hhdpo.core.io import DataError
from hhdpo.data.batching import collate_groups, length_partition, rank_batches, resume_batch_index
from hhdpo.data.hh import (
    ASSISTANT,
    fit_prompt,
    load_pairs,
    prompt_ids,
    seed_split,
    split_pair,
    tokenize_pair,
    train_val_split,
)
from hhdpo.data.sources import slice_split


@pytest.fixture(scope="module")
def raw(hh_file):
    with gzip.open(hh_file, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from hhdpo.core.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def test_real_file_counts(hh_file, raw):
    pairs, skipped = load_pairs(str(hh_file), "train", log=None)
    assert len(raw) == 2312
    assert len(pairs) + sum(skipped.values()) == 2312
    assert skipped == {"empty_response": 4, "diverges_before_last_turn": 5}
    assert len(slice_split(raw, "train[:10%]")) == 231 and len(slice_split(raw, "x[100:110]")) == 10


def test_divergent_pairs_are_skipped_and_counted(hh_file, raw, tok):
    """Pairs whose conversations differ before their last turn (found here by the seed's
    own last-turn split, independently of split_pair) are skipped; no kept response spans
    more than one turn, as text or as trained tokens."""
    divergent = {i for i, r in enumerate(raw) if seed_split(r["chosen"])[0] != seed_split(r["rejected"])[0]}
    assert len(divergent) == 5
    reasons = [split_pair(raw[i]["chosen"], raw[i]["rejected"]) for i in sorted(divergent)]
    assert reasons == ["diverges_before_last_turn"] * len(divergent)
    pairs, skipped = load_pairs(str(hh_file), "test", log=None)
    assert skipped["diverges_before_last_turn"] == len(divergent)
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    for i, r in enumerate(raw):
        pair = split_pair(r["chosen"], r["rejected"])
        if isinstance(pair, str):
            continue
        # kept pairs: the common prompt is both sides' last-turn prompt, and the rest one turn
        assert pair.prompt == seed_split(r["chosen"])[0] == seed_split(r["rejected"])[0]
        for which in ("chosen", "rejected"):
            text = getattr(pair, which)
            assert "\n\nHuman:" not in text and ASSISTANT not in text, (i, which)
    for pair in pairs:
        ex = tokenize_pair(pair, tok, max_len=4096)
        for ids in (ex["chosen_ids"], ex["rejected_ids"]):
            assert start not in ids and ids.count(end) == 1 and ids[-1] == end  # one assistant turn


def test_split_edge_cases():
    assert split_pair("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: yo\n\nAssistant: a") == "no_common_assistant_turn"
    assert split_pair("\n\nHuman: hi\n\nAssistant:", "\n\nHuman: hi\n\nAssistant: b") == "empty_response"
    p = split_pair("\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: x",
                   "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: y")
    assert p.prompt_messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "more"}]
    assert p.chosen_messages == [{"role": "assistant", "content": "x"}]
    # the two conversations part before their last turn: the responses would hold a human turn
    assert split_pair("\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: x",
                      "\n\nHuman: hi\n\nAssistant: b") == "diverges_before_last_turn"


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"})
    f.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_pairs(str(f), "train", log=None)
    f.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected string fields"):
        load_pairs(str(f), "train", log=None)
    with pytest.raises(DataError, match="not found"):
        load_pairs(str(tmp_path / "nope.jsonl"), "train", log=None)


def test_response_tokens_are_the_template_assistant_turn(hh_file, tok):
    pairs, _ = load_pairs(str(hh_file), "train[:20]", log=None)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for pair in pairs:
        ex = tokenize_pair(pair, tok, max_len=4096)
        for which in ("chosen", "rejected"):
            msgs = pair.prompt_messages + getattr(pair, f"{which}_messages")
            full = tok.apply_chat_template(msgs, tokenize=False)
            prompt = tok.apply_chat_template(pair.prompt_messages, tokenize=False, add_generation_prompt=True)
            assert full.startswith(prompt)
            ids = ex[f"{which}_ids"]
            assert ids[-1] == eot  # ends with the end-of-turn token, nothing after
            assert tok.decode(ids) == full[len(prompt):].rstrip("\n")
        assert tok.decode(ex["prompt_ids"]) == prompt


def test_no_doubled_bos(hh_file, smollm2_dir):
    """Llama-3 style: the template emits BOS and the tokenizer adds BOS too. Tokenizing the
    rendered template text (the seed) doubles it; rendering straight to ids (ours) does not."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    pairs, _ = load_pairs(str(hh_file), "train[:5]", log=None)
    for pair in pairs:
        text = tok.apply_chat_template(pair.prompt_messages, tokenize=False, add_generation_prompt=True)
        assert tok(text)["input_ids"][:2] == [bos, bos]  # the seed's doubled BOS
        ours = prompt_ids(pair, tok)
        assert ours[0] == bos and ours.count(bos) == 1
        ex = tokenize_pair(pair, tok, max_len=4096)
        assert (ex["prompt_ids"] + ex["chosen_ids"] + ex["rejected_ids"]).count(bos) == 1


def test_truncation_keeps_response_and_prompt_end(hh_file, tok):
    pairs, _ = load_pairs(str(hh_file), "train[:300]", log=None)
    long_prompt = max(pairs, key=lambda p: len(p.prompt))
    full = tokenize_pair(long_prompt, tok, max_len=100000)
    cut = tokenize_pair(long_prompt, tok, max_len=64, max_prompt_len=40)
    assert len(cut["prompt_ids"]) + max(len(cut["chosen_ids"]), len(cut["rejected_ids"])) <= 64
    assert cut["prompt_ids"][-10:] == full["prompt_ids"][-10:]  # the end of the conversation is kept
    assert cut["prompt_ids"][0] == full["prompt_ids"][0]  # the template's first token is kept
    for p in pairs:
        ex = tokenize_pair(p, tok, max_len=48, max_prompt_len=40)
        assert len(ex["chosen_ids"]) >= 1 and len(ex["rejected_ids"]) >= 1
        assert len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= 48


def _render(tok, msgs) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("limit", [40, 128])
def test_truncated_prompts_are_well_formed_chats(hh_file, tok, limit):
    """Every prompt of the real file, fitted to ``limit`` SmolLM2 tokens, is a chat the
    template itself renders: its first role header (after the default system prompt), a role
    after each <|im_start|>, whole turns from the end of the conversation (as many as fit),
    and a last user turn that is whole when it fits alone, else its own end."""
    pairs, _ = load_pairs(str(hh_file), "test", log=None)
    head = _render(tok, [{"role": "user", "content": "\x00"}]).split("\x00")[0]  # system prompt + user header
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    dropped = cut = 0
    for pair in pairs:
        msgs = pair.prompt_messages
        ids = fit_prompt(pair, tok, limit)[1]
        text = tok.decode(ids)
        assert len(ids) <= limit and text.startswith(head) and text.endswith(tail)
        assert text.count("<|im_start|>") == len(re.findall(r"<\|im_start\|>(system|user|assistant)\n", text))
        assert _render(tok, msgs).endswith(text[len(head):])  # the end of this conversation
        # whole user-first suffixes, longest first, rendered by the template (not by fit_prompt)
        fitting = [k for k in range(len(msgs), 0, -1)
                   if msgs[-k]["role"] == "user" and len(tok(_render(tok, msgs[-k:]))["input_ids"]) <= limit]
        if fitting:
            assert text == _render(tok, msgs[-fitting[0]:])
            dropped += fitting[0] < len(msgs)
        else:  # the last user turn alone is too long: only its end is kept, still under its header
            cut += 1
            assert text.count("<|im_start|>") == 3 and msgs[-1]["content"].endswith(text[len(head):-len(tail)])
    assert dropped > 0 and cut > 0  # both ways of fitting happen on this file


def test_truncation_without_chat_template_keeps_whole_hh_turns(hh_file, tok):
    pairs, _ = load_pairs(str(hh_file), "test[:200]", log=None)
    for pair in pairs:
        ids = tokenize_pair(pair, tok, max_len=96, max_prompt_len=48, use_chat_template=False)["prompt_ids"]
        text = tok.decode(ids)
        assert len(ids) <= 96 and text.startswith("\n\nHuman: ") and text.endswith(ASSISTANT)
        assert pair.prompt.endswith(text[len("\n\nHuman: "):])


def test_prompt_limit_below_the_template_frame_is_a_data_error(hh_file, tok):
    pairs, _ = load_pairs(str(hh_file), "test[:50]", log=None)
    pair = max(pairs, key=lambda p: len(p.prompt))
    frame = len(tok(_render(tok, [{"role": "user", "content": ""}]))["input_ids"])
    with pytest.raises(DataError, match=f"limit of {frame} tokens.*takes {frame}"):
        fit_prompt(pair, tok, frame)
    assert len(fit_prompt(pair, tok, frame + 1)[1]) == frame + 1


def test_collate_masks_prompt_and_padding():
    exs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
           {"prompt_ids": [7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13]}]
    (b,) = collate_groups(exs, pad_id=0)
    assert b["rows"].tolist() == [0, 1, 2, 3]
    assert b["input_ids"].shape == (4, 5)  # longest row, not max_len
    assert b["labels"][0].tolist() == [-100, -100, -100, 4, 5]
    assert b["labels"][2].tolist() == [-100, -100, -100, 6, -100]
    assert b["labels"][1].tolist() == [-100, 8, 9, 10, 11]
    assert b["attention_mask"][3].tolist() == [1, 1, 1, 0, 0]
    assert torch.equal(b["input_ids"][3], torch.tensor([7, 12, 13, 0, 0]))


def _padded_cost(lengths, groups, f):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups) + f * len(groups)


def test_length_partition_is_optimal():
    """Checked against every contiguous split of the sorted rows (all 2^(n-1) of them)."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        lengths = [rng.randint(1, 300) for _ in range(n)]
        f = rng.choice([0, 16, 64, 500])
        got = length_partition(lengths, f)
        assert sorted(i for g in got for i in g) == list(range(n))
        order = sorted(range(n), key=lambda i: lengths[i])
        best = min(
            _padded_cost(lengths, [order[a:b] for a, b in zip((0,) + cuts, cuts + (n,))], f)
            for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        assert _padded_cost(lengths, got, f) == best
    assert length_partition([10, 10, 10, 10], 64) == [[0, 1, 2, 3]]  # nothing to save: one forward
    assert sorted(map(sorted, length_partition([20, 300, 25, 290], 64))) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("by_length", [True, False])
def test_collate_groups_hold_every_row_once_with_its_own_padding(by_length):
    exs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": list(range(20, 40))},
           {"prompt_ids": [7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13]},
           {"prompt_ids": [1] * 30, "chosen_ids": [50] * 40, "rejected_ids": [51] * 38}]
    (full,) = collate_groups(exs, pad_id=0)
    parts = collate_groups(exs, pad_id=0, by_length=by_length)
    assert sorted(int(r) for g in parts for r in g["rows"]) == list(range(6))
    if not by_length:
        assert len(parts) == 1 and all(torch.equal(parts[0][k], full[k]) for k in ("input_ids", "labels", "attention_mask"))
    for g in parts:
        width = g["input_ids"].shape[1]
        assert width == int(g["attention_mask"].sum(1).max())  # padded to its own longest row
        for j, r in enumerate(g["rows"].tolist()):
            assert torch.equal(g["input_ids"][j, :width], full["input_ids"][r, :width])
            assert torch.equal(g["labels"][j], full["labels"][r, :width])
    if by_length:
        assert len(parts) == 2  # the 70- and 68-token rows of pair 3 apart from the rest


def test_rank_batches_disjoint_and_deterministic():
    world, bs = 3, 4
    parts = [rank_batches(101, bs, r, world, epoch=2, seed=7) for r in range(world)]
    flat = [i for p in parts for b in p for i in b]
    assert len(flat) == len(set(flat)) == 96
    assert all(len(p) == len(parts[0]) for p in parts)
    assert parts[1] == rank_batches(101, bs, 1, world, epoch=2, seed=7)
    assert parts[1] != rank_batches(101, bs, 1, world, epoch=3, seed=7)
    tr, va = train_val_split(100, 0.1, 42)
    assert len(va) == 10 and not set(tr) & set(va)
    assert (tr == train_val_split(100, 0.1, 42)[0]).all()


def test_data_cli_show(hh_file):
    from tests.conftest import run_cli

    r = run_cli("data", "--config", "configs/smollm2_cpu.yaml", "--show", "2", f"dataset.dataset_name={hh_file}",
                "dataset.subset=train")
    assert r.returncode == 0, r.stderr
    assert "=== pair 1" in r.stdout and "trained tokens" in r.stdout
    assert "2303 parsed, 9 skipped (diverges_before_last_turn=5, empty_response=4)" in r.stdout
    assert f"subsets: {hh_file.name}=2303" in r.stdout.splitlines()  # one file: one part, named after it


@pytest.mark.parametrize("before, after", [((1, 4), (2, 2)), ((2, 1), (1, 2)), ((4, 2), (2, 1)), ((1, 3), (2, 2))])
def test_resume_continues_with_the_same_pairs_on_another_world_or_batch_size(before, after):
    """After k micro-batches on (W, B), a run on (W', B') goes on exactly where the permutation left off."""
    n, seed, epoch = 100, 3, 1
    (w0, b0), (w1, b1) = before, after
    k = 3
    seen = [i for r in range(w0) for b in rank_batches(n, b0, r, w0, epoch, seed)[:k] for i in b]
    index, repeated = resume_batch_index(len(seen), b1, w1)
    assert repeated == len(seen) % (b1 * w1)
    nxt = [i for r in range(w1) for i in rank_batches(n, b1, r, w1, epoch, seed)[index]]
    perm = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    assert sorted(seen) == sorted(perm[:len(seen)])
    start = index * b1 * w1
    assert sorted(nxt) == sorted(perm[start:start + b1 * w1])
    if not repeated:
        assert not set(nxt) & set(seen)  # nothing seen twice, nothing skipped
