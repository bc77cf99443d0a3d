"""hhdpo pairwise: the seed's record format, a deterministic per-idx shuffle, clear input errors."""

import json

import pytest

from hhdpo.core.io import DataError
from hhdpo.evaluation import pairwise
from hhdpo.evaluation.winner import map_winner
from tests.fake_responses_server import hh_generation_records

SEED_KEYS = ["idx", "prompt", "a", "b", "a_id", "b_id", "is_swapped", "shuffle_seed"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def gen_file(tmp_path):
    return write_jsonl(tmp_path / "policy_out.jsonl", hh_generation_records(40))


def test_unshuffled_format_matches_seed(gen_file, tmp_path):
    out = tmp_path / "pw.jsonl"
    stats = pairwise.make_pairwise(gen_file, out)
    gen, recs = read_jsonl(gen_file), read_jsonl(out)
    assert stats["n"] == len(recs) == len(gen) and stats["swapped"] == 0
    for g, r in zip(gen, recs):
        assert list(r) == SEED_KEYS
        assert r == {"idx": g["idx"], "prompt": g["prompt"], "a": g["response"], "b": g["HH_response"],
                     "a_id": "policy_model", "b_id": "hh_chosen", "is_swapped": False, "shuffle_seed": 0}
    assert recs[0]["prompt"].startswith("\n\nHuman:") and recs[0]["prompt"].endswith("\n\nAssistant:")


def test_shuffle_is_deterministic_per_idx_and_swaps_contents(gen_file, tmp_path):
    gen = read_jsonl(gen_file)
    out1, out2, out_sub, out_other = (tmp_path / f"{n}.jsonl" for n in ("one", "two", "sub", "other"))
    pairwise.make_pairwise(gen_file, out1, shuffle_ab=True, seed=3)
    pairwise.make_pairwise(gen_file, out2, shuffle_ab=True, seed=3)
    assert out1.read_bytes() == out2.read_bytes()  # reruns are identical

    # a subset (e.g. a resumed or partial run) gives every shared idx the same order
    sub = write_jsonl(tmp_path / "subset.jsonl", gen[1::3])
    pairwise.make_pairwise(sub, out_sub, shuffle_ab=True, seed=3)
    full = {r["idx"]: r["is_swapped"] for r in read_jsonl(out1)}
    assert all(full[r["idx"]] == r["is_swapped"] for r in read_jsonl(out_sub))

    recs = read_jsonl(out1)
    n_swapped = sum(r["is_swapped"] for r in recs)
    assert 0 < n_swapped < len(recs)
    for g, r in zip(gen, recs):
        if r["is_swapped"]:
            assert (r["a"], r["a_id"], r["b"], r["b_id"]) == (g["HH_response"], "hh_chosen", g["response"], "policy_model")
        else:
            assert (r["a"], r["b"]) == (g["response"], g["HH_response"])
        assert r["shuffle_seed"] == 3
        # the judge maps "A wins" back to the model exactly when A holds the model response
        assert map_winner("a", r["a_id"], r["b_id"], r["is_swapped"])[0] == ("chosen" if r["is_swapped"] else "model")

    pairwise.make_pairwise(gen_file, out_other, shuffle_ab=True, seed=4)
    assert [r["is_swapped"] for r in read_jsonl(out_other)] != [r["is_swapped"] for r in recs]


def test_swap_coin_is_fair_and_stable():
    flips = [pairwise.swap_for(0, i) for i in range(2000)]
    assert 900 < sum(flips) < 1100
    assert pairwise.swap_for(0, 17) == pairwise.swap_for(0, 17)
    assert [pairwise.swap_for(1, i) for i in range(64)] != flips[:64]


def test_seed_cli_flags_and_ids(gen_file, tmp_path, capsys):
    out = tmp_path / "pw.jsonl"
    rc = pairwise.cli(["--in_file", str(gen_file), "--out_file", str(out), "--shuffle_ab", "--seed", "42",
                       "--a_id", "dpo_v2", "--b_id", "human_chosen", "--keep_meta"])
    assert rc == 0 and "wrote 40 pairs" in capsys.readouterr().out
    recs = read_jsonl(out)
    assert {frozenset((r["a_id"], r["b_id"])) for r in recs} == {frozenset(("dpo_v2", "human_chosen"))}
    assert all(r["shuffle_seed"] == 42 and r["dataset"] == "Anthropic/hh-rlhf" and "response" in r for r in recs)
    for r in recs:  # custom labels still map back: by is_swapped when no side is called hh_chosen
        assert map_winner("a", r["a_id"], r["b_id"], r["is_swapped"]) == (
            ("chosen", "dpo_v2", "human_chosen") if r["is_swapped"] else ("model", "dpo_v2", "human_chosen"))
        assert map_winner("a", r["a_id"], r["b_id"], r["is_swapped"], chosen_id="human_chosen")[0] == (
            "chosen" if r["is_swapped"] else "model")


def test_config_defaults_and_override(gen_file, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval:\n  shuffle_ab: true\n  seed: 7\n")
    out = tmp_path / "pw.jsonl"
    assert pairwise.cli(["--config", str(cfg), "--in_file", str(gen_file), "--out_file", str(out)]) == 0
    recs = read_jsonl(out)
    assert recs[0]["shuffle_seed"] == 7 and any(r["is_swapped"] for r in recs)
    assert pairwise.cli(["--config", str(cfg), "--in_file", str(gen_file), "--out_file", str(out), "--no-shuffle_ab"]) == 0
    assert not any(r["is_swapped"] for r in read_jsonl(out))


@pytest.mark.parametrize("bad_line, message", [
    ('{"idx": 2, "prompt": "p", "response": "r"\n', "malformed JSON"),
    ('{"idx": 2, "prompt": "p", "response": "r"}\n', "missing key 'HH_response'"),
    ('{"idx": 2, "prompt": "p", "response": 5, "HH_response": "c"}\n', "'response' must be a string"),
    ('{"idx": 0, "prompt": "p", "response": "r", "HH_response": "c"}\n', "duplicate idx 0"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, bad_line, message):
    good = [json.dumps(r) + "\n" for r in hh_generation_records(2)]
    src = tmp_path / "gen.jsonl"
    src.write_text("".join(good) + bad_line)
    out = tmp_path / "pw.jsonl"
    with pytest.raises(DataError, match=rf"gen\.jsonl:3: .*{message}"):
        pairwise.make_pairwise(src, out)
    assert pairwise.cli(["--in_file", str(src), "--out_file", str(out)]) == 2
    assert "gen.jsonl:3" in capsys.readouterr().err
    assert not out.exists()  # written atomically: no partial output


def test_model_id_equal_to_chosen_id_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "gen.jsonl", hh_generation_records(2, model_id="hh_chosen"))
    with pytest.raises(DataError, match="gen.jsonl:1: .*both 'hh_chosen'"):
        pairwise.make_pairwise(src, tmp_path / "pw.jsonl")
