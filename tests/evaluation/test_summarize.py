"""hhdpo summarize: counts via winner_model_vs_chosen, Wilson CIs, the two-proportion test, outputs."""

import json
import math

import pytest
from scipy.stats import binomtest, norm

from hhdpo.evaluation import paired as P
from hhdpo.evaluation import summarize as S
from hhdpo.evaluation.pairwise import make_pairwise
from tests.fake_responses_server import hh_generation_records


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
    derived from each pair's is_swapped; winner_model_vs_chosen is the outcome itself."""
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
            chosen_slot = "a" if model_slot == "b" else "b"
            rec.update(winner=raw, winner_model_vs_chosen=outcome, model_id=p[f"{model_slot}_id"],
                       chosen_id=p[f"{chosen_slot}_id"])
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
    un = c["unpaired"]
    assert un["diff"] == pytest.approx(0.2) and un["z"] == pytest.approx(2.0) and un["p_value"] == pytest.approx(0.0455, abs=1e-4)
    # both files number their prompts 0.., so they are paired: idx 20-29 policy wins where base loses,
    # no prompt goes the other way: p = 2 * C(10, 10) / 2^10
    assert c["test"] == "paired" and c["p_value"] == pytest.approx(2 / 2 ** 10)
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
    # paired on idx 0-9 (idx 10 is policy's only): policy better on idx 4-6, never worse
    assert "| policy_model | base_model | paired exact sign test | 10 shared (0 judge error/no verdict on one side, " \
           "1 in one file only excluded) | 3 / 0 / 7 | +30.0 pp (ties = ½) | 0.25 |" in table
    data = json.loads(out_json.read_text())
    assert data == json.loads(json.dumps(S.summarize([pol, base])))
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000
    with pytest.raises(SystemExit):
        S.cli([])


# --------------------------------------------------------------------------- paired test (issue #7 section 6)


def verdicts(path, outcomes: dict, prompt=lambda i: f"\n\nHuman: question {i}\n\nAssistant:"):
    """A judged file from {idx: model|chosen|tie|error}, written directly (no judge code)."""
    recs = []
    for i, o in outcomes.items():
        rec = {"idx": i, "prompt": prompt(i), "judge_model": "fake-judge", "winner_model_vs_chosen": o}
        if o == "error":  # what the seed wrote for a failed call: a tie, which must not count
            rec.update(winner_model_vs_chosen="tie", judge_error="HTTP 500 (gave up after 7 attempts)")
        recs.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def shifted_pair(tmp_path):
    """60 usable shared prompts: 20 both win, 28 both lose, 12 policy ties where base loses,
    2 base wins where policy loses; 5 prompts with a judge error on one side; 1 policy-only prompt."""
    pol, base, i = {}, {}, 0
    for n, po, bo in ((20, "model", "model"), (28, "chosen", "chosen"), (12, "tie", "chosen"), (2, "chosen", "model"),
                      (3, "error", "model"), (2, "model", "error")):
        for _ in range(n):
            pol[i], base[i] = po, bo
            i += 1
    pol[i] = "model"
    return verdicts(tmp_path / "policy_judged.jsonl", pol), verdicts(tmp_path / "base_judged.jsonl", base)


def test_paired_test_is_significant_where_the_unpaired_one_is_not(tmp_path):
    pol, base = shifted_pair(tmp_path)
    (c,) = S.summarize([pol, base], labels=["policy", "base"])["comparisons"]
    pr = c["paired"]
    assert c["test"] == "paired"
    assert (pr["shared"], pr["a_better"], pr["b_better"], pr["same"]) == (62, 12, 2, 48)
    assert (pr["excluded_error"], pr["only_a"], pr["only_b"], pr["prompt_mismatch"]) == (5, 1, 0, 0)
    # exact two-sided sign test, 12 vs 2 of 14 discordant: 2 * (C(14,0) + C(14,1) + C(14,2)) / 2^14
    p_hand = 2 * (1 + 14 + 91) / 2 ** 14
    assert c["p_value"] == pytest.approx(p_hand, rel=1e-12) and c["p_value"] < 0.05
    # mean per-prompt score difference: 12 * (0.5 - 0) + 2 * (0 - 1) over 62 prompts
    assert c["diff"] == pytest.approx((12 * 0.5 - 2) / 62)
    # the unpaired z-test on the same files, errors and ties dropped per arm:
    # policy wins 20 + 2 + 1 of 23 + 30, base wins 20 + 2 + 3 of 25 + 40
    k1, n1, k2, n2 = 23, 53, 25, 65
    pool = (k1 + k2) / (n1 + n2)
    z = (k1 / n1 - k2 / n2) / math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    un = c["unpaired"]
    assert un["z"] == pytest.approx(z) and un["p_value"] == pytest.approx(2 * norm.sf(abs(z)))
    assert un["p_value"] > 0.3


@pytest.mark.parametrize("a, b", [(12, 2), (3, 9), (5, 5), (0, 7), (1, 0)])
def test_sign_test_is_the_two_sided_binomial_sum(a, b):
    n = a + b
    # two-sided exact test with p = 1/2 (symmetric): sum the probabilities no larger than P(a)
    probs = [math.comb(n, k) / 2 ** n for k in range(n + 1)]
    p_hand = min(1.0, sum(q for q in probs if q <= probs[a] * (1 + 1e-7)))
    assert P.sign_test(a, b) == pytest.approx(p_hand, rel=1e-12)
    assert P.sign_test(0, 0) == 1.0


def test_files_without_shared_prompts_fall_back_to_the_unpaired_test(tmp_path):
    pol = verdicts(tmp_path / "p.jsonl", {i: "model" if i < 30 else "chosen" for i in range(50)})
    base = verdicts(tmp_path / "b.jsonl", {100 + i: "model" if i < 20 else "chosen" for i in range(50)})
    (c,) = S.summarize([pol, base], labels=["policy", "base"])["comparisons"]
    assert c["test"] == "unpaired" and c["paired"]["shared"] == 0 and c["paired"]["p_value"] is None
    assert (c["paired"]["only_a"], c["paired"]["only_b"]) == (50, 50)
    assert c["diff"] == pytest.approx(0.2) and c["p_value"] == pytest.approx(2 * norm.sf(2.0))  # z = 2, see above
    # the same idx with different prompts is not the same prompt
    other = verdicts(tmp_path / "o.jsonl", {i: "chosen" for i in range(50)}, prompt=lambda i: f"other {i}")
    (c,) = S.summarize([pol, other])["comparisons"]
    assert c["test"] == "unpaired" and c["paired"]["prompt_mismatch"] == 50


def test_paired_result_in_table_json_and_png(tmp_path, capsys):
    pol, base = shifted_pair(tmp_path)
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    assert S.cli([str(pol), str(base), "--label", "policy", "base", "--out-json", str(out_json),
                  "--out-png", str(out_png)]) == 0
    table = capsys.readouterr().out
    p_hand = 2 * (1 + 14 + 91) / 2 ** 14
    assert (f"| policy | base | paired exact sign test | 62 shared (5 judge error/no verdict on one side, 1 in one "
            f"file only excluded) | 12 / 2 / 48 | +6.5 pp (ties = ½) | {p_hand:.4g} |") in table
    data = json.loads(out_json.read_text())
    assert data["comparisons"][0]["test"] == "paired" and data["comparisons"][0]["p_value"] == pytest.approx(p_hand)
    assert S.describe_test(data["comparisons"][0]) == (f"policy vs base: paired exact sign test, p = {p_hand:.4g}\n"
                                                       "62 shared prompts (6 excluded): policy better 12, base better 2, same 48")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- stage contract


def test_config_mode_summarizes_the_runs_eval_dir(tmp_path, capsys):
    ev = tmp_path / "run" / "out" / "eval"
    ev.mkdir(parents=True)
    shifted = shifted_pair(tmp_path)
    for name, src in zip(("policy", "base"), shifted):
        (ev / f"{name}_judged.jsonl").write_text(src.read_text())
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nHH_test:\n  HH_test_policy_out: out/eval/policy_out.jsonl\n")
    # overrides before and after --config, in any order
    assert S.cli(["eval.seed=3", "--config", str(cfg), "--confidence", "0.9"]) == 0
    data = json.loads((ev / "summary.json").read_text())
    assert [r["label"] for r in data["files"]] == ["policy", "base"] and data["confidence"] == 0.9
    assert data["comparisons"][0]["test"] == "paired"
    assert (ev / "summary.md").read_text().startswith("| model |")
    assert (ev / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one model; eval.out_dir moves the eval dir
    (tmp_path / "ev2").mkdir()
    (tmp_path / "ev2" / "base_judged.jsonl").write_text(shifted[1].read_text())
    assert S.cli(["--config", str(cfg), f"eval.out_dir={tmp_path / 'ev2'}", "--models", "base"]) == 0
    data = json.loads((tmp_path / "ev2" / "summary.json").read_text())
    assert [r["label"] for r in data["files"]] == ["base"] and data["comparisons"] == []


def test_bad_input_exits_2(tmp_path, capsys):
    f = tmp_path / "j.jsonl"
    f.write_text('{"idx": 0, "winner_model_vs_chosen": "model"}\n{oops\n')
    assert S.cli([str(f)]) == 2
    assert f"{f}:2: malformed JSON" in capsys.readouterr().err
    assert S.cli(["--in_file", str(f), "--label", "a", "b"]) == 2  # more labels than files
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"eval:\n  out_dir: {tmp_path / 'nothing'}\n")
    assert S.cli(["--config", str(cfg)]) == 2
    assert "policy_judged.jsonl: file not found" in capsys.readouterr().err
    assert S.cli(["--config", str(cfg), "eval.shuffle_ab=maybe"]) == 2
