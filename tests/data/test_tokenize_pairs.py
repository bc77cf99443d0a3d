"""tokenize_pairs (batched, the prompt tokenized once) gives exactly the ids of the straightforward
per-pair path, on every pair of the real HH file."""

from __future__ import annotations

import pytest

from hhdpo.core.config import DatasetConfig
from hhdpo.core.models import load_tokenizer
from hhdpo.data import hh


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def reference(pair: hh.Pair, tok, max_len: int, max_prompt_len: int | None, use_chat_template: bool) -> dict:
    """tokenize_pair as it was written before tokenize_pairs was batched: every text rendered and
    tokenized whole by apply_chat_template(tokenize=True), one call per text."""
    def response(which, p, msgs):
        if not use_chat_template:
            return tok(" " + getattr(pair, which), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        full = _ids(tok.apply_chat_template(msgs + getattr(pair, f"{which}_messages"), tokenize=True))
        assert full[:len(p)] == p
        ids = full[len(p):]
        while ids and tok.decode(ids[-1:]).strip() == "" and ids[-1] != tok.eos_token_id:
            ids = ids[:-1]
        return ids

    if use_chat_template:
        p = _ids(tok.apply_chat_template(pair.prompt_messages, add_generation_prompt=True, tokenize=True))
    else:
        p = tok(pair.prompt, add_special_tokens=True)["input_ids"]
    c, r = response("chosen", p, pair.prompt_messages), response("rejected", p, pair.prompt_messages)
    limit = min(len(p), max(max_len - max(len(c), len(r)), max_prompt_len or max_len // 2))
    if len(p) > limit:  # oldest turns dropped / text cut: hh.fit_prompt, which tokenize_pairs calls as it was
        msgs, p = hh.fit_prompt(pair, tok, limit, use_chat_template)
        c, r = response("chosen", p, msgs), response("rejected", p, msgs)
    budget = max_len - len(p)
    return {"prompt_ids": p, "chosen_ids": c[:budget], "rejected_ids": r[:budget]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def pairs(hh_file):
    return hh.load_pairs(str(hh_file), "test", log=None)[0]


def test_every_pair_of_the_real_file_at_the_seeds_lengths(pairs, tok):
    assert len(pairs) > 2000
    ds = DatasetConfig(max_len=512, max_prompt_len=256)
    got = hh.tokenize_pairs(pairs, tok, ds)
    want = [reference(p, tok, 512, 256, True) for p in pairs]
    assert len(got) == len(want)
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not bad, f"{len(bad)} pairs differ, first {bad[:5]}"
    cut = sum(len(ex["prompt_ids"]) < len(hh.prompt_ids(p, tok)) for p, ex in zip(pairs, got))
    assert cut > 10  # prompts cut to fit (hh.fit_prompt) are among them


@pytest.mark.parametrize("max_len,max_prompt_len,use_chat_template", [(128, 64, True), (72, 40, True), (96, None, False)])
def test_truncating_and_plain_settings(pairs, tok, max_len, max_prompt_len, use_chat_template):
    sub = pairs[:400]
    ds = DatasetConfig(max_len=max_len, max_prompt_len=max_prompt_len, use_chat_template=use_chat_template)
    got = hh.tokenize_pairs(sub, tok, ds)
    assert got == [reference(p, tok, max_len, max_prompt_len, use_chat_template) for p in sub]
    assert got == [hh.tokenize_pair(p, tok, max_len, max_prompt_len, use_chat_template) for p in sub]


def test_the_prompt_is_tokenized_once(pairs, tok, monkeypatch):
    """Characters sent to the tokenizer: the prompt's text once plus short tails, not three whole texts."""
    sub = pairs[:200]
    whole = sum(len(tok.apply_chat_template(p.prompt_messages + extra, add_generation_prompt=not extra, tokenize=False))
                for p in sub for extra in ([], p.chosen_messages, p.rejected_messages))
    sent = []
    real = hh._encode
    monkeypatch.setattr(hh, "_encode", lambda t, texts, special=False: sent.append(sum(map(len, texts))) or real(t, texts, special))
    hh.tokenize_pairs(sub, tok, DatasetConfig(max_len=10**6, max_prompt_len=10**6 - 1))
    assert sum(sent) < 0.6 * whole, (sum(sent), whole)


def test_a_cut_that_changes_the_ids_is_caught_and_whole_texts_are_used(pairs, tok, monkeypatch):
    """Cutting inside an added token (a tokenizer whose pieces depend on where they are) changes the
    ids of the first pairs: the check sees it and every pair is tokenized whole, with the same ids."""
    sub = pairs[:30]
    monkeypatch.setattr(hh, "_head_marks", lambda _tok: ("<|im_sta",))
    monkeypatch.setattr(hh, "_CHUNK", 10)  # later chunks too
    ds = DatasetConfig(max_len=512, max_prompt_len=256)
    want = [reference(p, tok, 512, 256, True) for p in sub]
    assert hh.tokenize_pairs(sub, tok, ds) == want
    monkeypatch.setattr(hh, "_CHECKED", 0)  # unchecked, that cut would have changed the ids
    assert hh.tokenize_pairs(sub, tok, ds) != want
