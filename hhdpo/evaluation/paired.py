"""Paired comparison of two judged files over the prompts they share (the same ``idx``).

Policy and base are judged on the same prompts against the same HH chosen responses, so
their verdicts are paired. Per prompt, the outcome against the chosen response is scored
(:func:`score`)::

    win = 1,  tie = 1/2,  loss = 0          (judge_error or no usable verdict: none)

and for each idx scored in both files, A is better (score_a > score_b), B is better, or
they are the same. Under H0 (A and B equally good) a discordant prompt favours A or B
with probability 1/2 each, so with d = a_better + b_better::

    p = sum over k with P(k) <= P(a_better) of C(d, k) / 2^d       (two-sided, exact)

the exact sign test, which is McNemar's exact test when there are no ties. Prompts where
both lose (or both win) say nothing about the difference; the unpaired two-proportion
z-test counts them as noise in both arms, which is why it has less power here.
"""

from __future__ import annotations

from typing import Optional

_SCORE = {"model": 1.0, "tie": 0.5, "chosen": 0.0}


def score(rec: dict) -> Optional[float]:
    """A judged record's outcome vs the HH chosen response: 1 win, 0.5 tie, 0 loss, None error."""
    if rec.get("judge_error"):
        return None
    return _SCORE.get(rec.get("winner_model_vs_chosen"))


def by_idx(records) -> dict:
    """idx -> (score, prompt); the last record per idx counts (as in summarize.count_verdicts)."""
    out = {}
    for i, r in enumerate(records):
        out[r.get("idx", f"#{i}")] = (score(r), r.get("prompt"))
    return out


def sign_test(a_better: int, b_better: int) -> float:
    """Exact two-sided binomial test of P(A better | discordant) = 1/2 (scipy binomtest);
    1.0 when there is no discordant prompt (no evidence either way)."""
    from scipy.stats import binomtest

    n = a_better + b_better
    return 1.0 if n == 0 else float(binomtest(a_better, n, 0.5).pvalue)


def paired_comparison(a_records, b_records) -> dict:
    """Pair two judged files by idx and sign-test the discordant prompts.

    Args: the records of file A and file B (dicts with ``idx``, ``winner_model_vs_chosen``,
    optional ``judge_error`` and ``prompt``).
    Returns counts: ``shared`` (idx scored in both), ``a_better``, ``b_better``, ``same``,
    ``excluded_error`` (idx in both files but an error or no verdict on one side),
    ``only_a``/``only_b`` (idx in one file only), ``prompt_mismatch`` (same idx, different
    prompt text: not the same prompt, so not paired); ``diff``, the mean of score_a - score_b
    over the shared prompts (the difference of the win rates with ties as half; None when
    none is shared); and ``p_value`` of :func:`sign_test` (None when none is shared).
    """
    a, b = by_idx(a_records), by_idx(b_records)
    out = {"shared": 0, "a_better": 0, "b_better": 0, "same": 0, "excluded_error": 0,
           "only_a": len(a.keys() - b.keys()), "only_b": len(b.keys() - a.keys()), "prompt_mismatch": 0}
    total = 0.0
    for idx in a.keys() & b.keys():
        (sa, pa), (sb, pb) = a[idx], b[idx]
        if pa is not None and pb is not None and pa != pb:
            out["prompt_mismatch"] += 1
        elif sa is None or sb is None:
            out["excluded_error"] += 1
        else:
            out["shared"] += 1
            total += sa - sb
            out["a_better" if sa > sb else "b_better" if sb > sa else "same"] += 1
    out["diff"] = total / out["shared"] if out["shared"] else None
    out["p_value"] = sign_test(out["a_better"], out["b_better"]) if out["shared"] else None
    return out
