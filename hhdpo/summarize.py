"""``hhdpo summarize``: win/loss/tie per judged file, Wilson CIs, a policy-vs-base test.

Verdicts are read ONLY through ``winner_model_vs_chosen`` (model | chosen | tie), so
shuffled and unshuffled files of the same judgements give the same numbers. A record
with ``judge_error`` (or without a usable mapped winner) is an error: reported, never a
tie, and excluded from every rate.

Two rates per file: the seed's win rate excluding ties, ``w / (w + l)``, and ties
counted as half a win, ``(w + t/2) / (w + l + t)``; each with a Wilson interval. With
several files, each is compared with the first by a pooled two-proportion z-test on the
win rate excluding ties (e.g. ``hhdpo summarize policy_judged.jsonl base_judged.jsonl``).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from hhdpo.io import DataError, atomic_write_bytes, atomic_write_json, iter_jsonl

_OUTCOME = {"model": "wins", "chosen": "losses", "tie": "ties"}

# --------------------------------------------------------------------------- maths


def z_quantile(confidence: float) -> float:
    """Two-sided normal quantile, e.g. 1.95996... for 0.95."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def wilson_ci(k: float, n: float, confidence: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """Wilson score interval for k successes out of n (k may be fractional: ties as half)."""
    if n <= 0:
        return None, None
    z = z_quantile(confidence)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def two_proportion_ztest(k1: float, n1: float, k2: float, n2: float) -> tuple[Optional[float], Optional[float]]:
    """Pooled two-sided z-test of p1 == p2; returns (z, p_value), None when undefined."""
    from scipy.stats import norm

    if n1 <= 0 or n2 <= 0:
        return None, None
    p1, p2, pool = k1 / n1, k2 / n2, (k1 + k2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    if se == 0:
        return (0.0, 1.0) if p1 == p2 else (None, None)
    z = (p1 - p2) / se
    return z, float(2 * norm.sf(abs(z)))


# --------------------------------------------------------------------------- counting


def count_verdicts(records) -> dict:
    """wins/losses/ties/errors over records (the last record per idx counts)."""
    by_idx, dupes = {}, 0
    for i, r in enumerate(records):
        key = r.get("idx", f"#{i}")
        dupes += key in by_idx
        by_idx[key] = r
    c = {"n": len(by_idx), "wins": 0, "losses": 0, "ties": 0, "errors": 0, "duplicates": dupes,
         "both_orders": 0, "orders_agree": 0}
    for r in by_idx.values():
        outcome = None if r.get("judge_error") else _OUTCOME.get(r.get("winner_model_vs_chosen"))
        c[outcome or "errors"] += 1
        if r.get("orders_agree") is not None:
            c["both_orders"] += 1
            c["orders_agree"] += bool(r["orders_agree"])
    return c


def rates(c: dict, confidence: float = 0.95) -> dict:
    w, l, t = c["wins"], c["losses"], c["ties"]
    out = {}
    n_ex, n_all = w + l, w + l + t
    out["win_rate"] = w / n_ex if n_ex else None
    out["win_rate_ci"] = list(wilson_ci(w, n_ex, confidence))
    out["win_rate_ties_half"] = (w + t / 2) / n_all if n_all else None
    out["win_rate_ties_half_ci"] = list(wilson_ci(w + t / 2, n_all, confidence))
    out["agreement_rate"] = c["orders_agree"] / c["both_orders"] if c["both_orders"] else None
    return out


def summarize_file(path, label: Optional[str] = None, confidence: float = 0.95) -> dict:
    records = [r for _, r in iter_jsonl(path)]
    c = count_verdicts(records)
    models = Counter(str(r["model_id"]) for r in records if r.get("model_id") is not None)
    judges = sorted({str(r["judge_model"]) for r in records if r.get("judge_model") is not None})
    auto = models.most_common(1)[0][0] if len(models) == 1 else Path(path).stem
    return {"file": str(path), "label": label or auto, "judge_models": judges, **c, **rates(c, confidence)}


def summarize(files, labels: Optional[list[str]] = None, confidence: float = 0.95) -> dict:
    """Summarise judged files; files after the first are each tested against the first."""
    files = [str(f) for f in files]
    labels = list(labels or [])
    if len(labels) > len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    rows = [summarize_file(f, labels[i] if i < len(labels) else None, confidence) for i, f in enumerate(files)]
    seen = Counter(r["label"] for r in rows)
    for r in rows:  # e.g. two runs both called policy_model: disambiguate by file
        if seen[r["label"]] > 1:
            r["label"] = f"{r['label']} ({Path(r['file']).stem})"
    comparisons = []
    for other in rows[1:]:
        ref = rows[0]
        z, p = two_proportion_ztest(ref["wins"], ref["wins"] + ref["losses"],
                                    other["wins"], other["wins"] + other["losses"])
        diff = None if ref["win_rate"] is None or other["win_rate"] is None else ref["win_rate"] - other["win_rate"]
        comparisons.append({"a": ref["label"], "b": other["label"], "metric": "win_rate",
                            "diff": diff, "z": z, "p_value": p})
    return {"confidence": confidence, "files": rows, "comparisons": comparisons}


# --------------------------------------------------------------------------- output


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "n/a" if ci[0] is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def markdown(summary: dict) -> str:
    conf = f"{100 * summary['confidence']:g}%"
    lines = [f"| model | n | wins | losses | ties | errors | win rate (excl. ties) | {conf} CI | "
             f"win rate (ties = ½) | {conf} CI | order agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in summary["files"]:
        lines.append(f"| {r['label']} | {r['n']} | {r['wins']} | {r['losses']} | {r['ties']} | {r['errors']} | "
                     f"{_pct(r['win_rate'])} | {_ci(r['win_rate_ci'])} | {_pct(r['win_rate_ties_half'])} | "
                     f"{_ci(r['win_rate_ties_half_ci'])} | {_pct(r['agreement_rate'])} |")
    if summary["comparisons"]:
        lines += ["", "| A | B | win-rate difference (A − B) | z | p-value |", "|---|---|---:|---:|---:|"]
        for c in summary["comparisons"]:
            diff = "n/a" if c["diff"] is None else f"{100 * c['diff']:+.1f} pp"
            z = "n/a" if c["z"] is None else f"{c['z']:.3f}"
            p = "n/a" if c["p_value"] is None else f"{c['p_value']:.4g}"
            lines.append(f"| {c['a']} | {c['b']} | {diff} | {z} | {p} |")
    return "\n".join(lines)


def plot_png(summary: dict, out_png) -> None:
    """Bar chart of both win rates with CI error bars (Agg, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = summary["files"]
    fig = Figure(figsize=(max(4.0, 1.6 * len(rows) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.38
    for j, (key, name) in enumerate((("win_rate", "excl. ties"), ("win_rate_ties_half", "ties = ½"))):
        xs, ys, err = [], [], [[], []]
        for i, r in enumerate(rows):
            if r[key] is None:
                continue
            lo, hi = r[f"{key}_ci"]
            xs.append(i + (j - 0.5) * width)
            ys.append(100 * r[key])
            err[0].append(100 * (r[key] - lo))
            err[1].append(100 * (hi - r[key]))
        ax.bar(xs, ys, width, yerr=err, capsize=4, label=name)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows])
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"win rate vs HH chosen (%), {100 * summary['confidence']:g}% Wilson CI")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(out_png, buf.getvalue())


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hhdpo summarize",
        description="Win/loss/tie vs HH chosen per judged file (via winner_model_vs_chosen), Wilson CIs, "
                    "and a two-proportion z-test of each file against the first (e.g. policy vs base).")
    p.add_argument("files", nargs="*", help="judged JSONL files (the first is the reference)")
    p.add_argument("--in_file", nargs="+", action="extend", default=[], help="judged JSONL file(s), same as positional")
    p.add_argument("--label", nargs="+", action="extend", default=[],
                   help="display name per file, in order (default: the files' model_id)")
    p.add_argument("--out_json", default=None, help="write the summary as JSON here")
    p.add_argument("--out_png", default=None, help="write a bar chart with CI error bars here")
    p.add_argument("--confidence", type=float, default=0.95, help="CI level (default: 0.95)")
    args = p.parse_args(argv)
    files = args.files + args.in_file
    if not files:
        p.error("give at least one judged file")
    if not 0 < args.confidence < 1:
        p.error("--confidence must be in (0, 1)")
    try:
        summary = summarize(files, args.label, args.confidence)
    except (DataError, ValueError) as e:
        print(f"hhdpo summarize: {e}", file=sys.stderr)
        return 1
    print(markdown(summary))
    if args.out_json:
        atomic_write_json(args.out_json, summary)
        print(f"wrote {args.out_json}", file=sys.stderr)
    if args.out_png:
        plot_png(summary, args.out_png)
        print(f"wrote {args.out_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
