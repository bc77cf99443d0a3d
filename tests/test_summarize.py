"""hhdpo summarize: counts via winner_model_vs_chosen, Wilson CIs, the two-proportion test, outputs."""

import json
import math

import pytest
from scipy.stats import binomtest, norm

from tests.fake_responses_server import hh_generation_records
from hhdpo import summarize as S
from hhdpo.judge import map_winner
from hhdpo.pairwise import make_pairwise


def wilson_closed_form(k, n, z):
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (37, 50), (250, 500), (10, 10), (7.5, 20)])
def test_wilson_matches_closed_form(k, n):
    z = norm.ppf(0.975)
    lo, hi = S.wilson_ci(k, n)
    assert (lo, hi) == pytest.approx(wilson_closed_form(k, n, z), abs=1e-12)
    if float(k).is_integer():
        ci = binomtest(int(k), n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)
    lo99, hi99 = S.wilson_ci(k, n, 0.99)
    assert lo99 <= lo and hi99 >= hi
    assert S.wilson_ci(0, 0) == (None, None)


def judged_file(path, outcomes, pairs=None, model_id="policy_model"):
    """Write a judged file whose model/chosen/tie outcomes are given; the raw A/B winner is
    derived from each pair's is_swapped, and winner_model_vs_chosen via the judge's mapping."""
    recs = []
    for i, outcome in enumerate(outcomes):
        p = dict(pairs[i]) if pairs else {"idx": i, "prompt": "\n\nHuman: hi\n\nAssistant:", "a": "x", "b": "y",
                                          "a_id": model_id, "b_id": "hh_chosen", "is_swapped": False}
        rec = {**p, "judge_model": "fake-judge"}
        if outcome == "error":
            # the seed wrote failed verdicts as ties; judge_error must win
            rec.update(winner="tie", winner_model_vs_chosen="tie", judge_error="HTTP 500 (gave up after 7 attempts)")
        else:
            model_slot = "b" if p["is_swapped"] else "a"
            raw = {"tie": "tie", "model": model_slot, "chosen": "a" if model_slot == "b" else "b"}[outcome]
            mvc, mid, cid = map_winner(raw, p["a_id"], p["b_id"], p["is_swapped"])
            rec.update(winner=raw, winner_model_vs_chosen=mvc, model_id=mid, chosen_id=cid)
        recs.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_shuffled_and_unshuffled_give_the_same_summary(tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in hh_generation_records(30)))
    outcomes = (["model"] * 12 + ["chosen"] * 11 + ["tie"] * 5 + ["error"] * 2)
    files = []
    for shuffle in (False, True):
        pw = tmp_path / f"pw_{shuffle}.jsonl"
        make_pairwise(gen, pw, shuffle_ab=shuffle, seed=5)
        pairs = [json.loads(line) for line in pw.read_text().splitlines()]
        assert any(p["is_swapped"] for p in pairs) == shuffle
        files.append(judged_file(tmp_path / f"judged_{shuffle}.jsonl", outcomes, pairs))
    a, b = (S.summarize([f])["files"][0] for f in files)
    keys = ("n", "wins", "losses", "ties", "errors", "win_rate", "win_rate_ci", "win_rate_ties_half")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert (a["wins"], a["losses"], a["ties"], a["errors"]) == (12, 11, 5, 2)
    assert a["win_rate"] == pytest.approx(12 / 23)
    assert a["win_rate_ties_half"] == pytest.approx(14.5 / 28)
    assert a["label"] == "policy_model"


def test_errors_and_unmapped_records_are_excluded(tmp_path):
    f = judged_file(tmp_path / "j.jsonl", ["model", "model", "chosen", "tie", "error", "error"])
    with f.open("a") as fh:  # a record with no usable mapped winner (e.g. from a foreign tool)
        fh.write(json.dumps({"idx": 99, "winner": "a"}) + "\n")
    s = S.summarize([f])["files"][0]
    assert (s["wins"], s["losses"], s["ties"], s["errors"], s["n"]) == (2, 1, 1, 3, 7)
    assert s["win_rate"] == pytest.approx(2 / 3)
    assert s["win_rate_ties_half"] == pytest.approx(2.5 / 4)


def test_two_proportion_test_against_hand_computation(tmp_path):
    # policy 30/50, base 20/50: pooled p = 0.5, se = sqrt(0.25 * (1/50 + 1/50)) = 0.1, z = 2
    z, p = S.two_proportion_ztest(30, 50, 20, 50)
    assert z == pytest.approx(2.0) and p == pytest.approx(0.04550026389635842)
    pol = judged_file(tmp_path / "policy_judged.jsonl", ["model"] * 30 + ["chosen"] * 20 + ["tie"] * 4 + ["error"])
    base = judged_file(tmp_path / "base_judged.jsonl", ["model"] * 20 + ["chosen"] * 30 + ["tie"] * 2, model_id="base_model")
    summary = S.summarize([pol, base])
    (c,) = summary["comparisons"]
    assert (c["a"], c["b"]) == ("policy_model", "base_model")
    assert c["diff"] == pytest.approx(0.2) and c["z"] == pytest.approx(2.0) and c["p_value"] == pytest.approx(0.0455, abs=1e-4)
    # hand check of an asymmetric case: 45/60 vs 30/55
    k1, n1, k2, n2 = 45, 60, 30, 55
    pool = (k1 + k2) / (n1 + n2)
    z_hand = (k1 / n1 - k2 / n2) / math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    z, p = S.two_proportion_ztest(k1, n1, k2, n2)
    assert z == pytest.approx(z_hand) and p == pytest.approx(math.erfc(abs(z_hand) / math.sqrt(2)))


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    pol = judged_file(tmp_path / "policy_judged.jsonl", ["model"] * 7 + ["chosen"] * 3 + ["tie"])
    base = judged_file(tmp_path / "base_judged.jsonl", ["model"] * 4 + ["chosen"] * 6, model_id="base_model")
    out_json, out_png = tmp_path / "out" / "summary.json", tmp_path / "out" / "winrate.png"
    rc = S.cli([str(pol), "--in_file", str(base), "--out_json", str(out_json), "--out_png", str(out_png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| policy_model | 11 | 7 | 3 | 1 | 0 | 70.0% |" in table
    assert "| base_model | 10 | 4 | 6 | 0 | 0 | 40.0% |" in table
    assert "| policy_model | base_model | +30.0 pp |" in table
    data = json.loads(out_json.read_text())
    assert data == json.loads(json.dumps(S.summarize([pol, base])))
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000
    with pytest.raises(SystemExit):
        S.cli([])
