"""``hhdpo summarize``: win/loss/tie per judged file, Wilson CIs, a policy-vs-base test.

    hhdpo summarize --config run/config.yaml [key=value ...] [--models policy,base]
    hhdpo summarize policy_judged.jsonl base_judged.jsonl [--label ...] [--out_json F] [--out_png F]

With no files, ``<run_paths(cfg).eval>/<name>_judged.jsonl`` of each model is summarized
into ``summary.json``, ``summary.md`` and ``summary.png`` in that directory (as ``hhdpo
eval`` does).

Verdicts are read ONLY through ``winner_model_vs_chosen`` (model | chosen | tie), so
shuffled and unshuffled files of the same judgements give the same numbers. A record
with ``judge_error`` (or without a usable mapped winner) is an error: reported, never a
tie, and excluded from every rate.

Two rates per file: the seed's win rate excluding ties, ``w / (w + l)``, and ties
counted as half a win, ``(w + t/2) / (w + l + t)``; each with a Wilson interval. With
several files, each is compared with the first (e.g. policy vs base): by the exact paired
sign test of :mod:`hhdpo.evaluation.paired` when they share prompts (the same idx), else by a pooled
two-proportion z-test on the win rate excluding ties. The z-test is reported for paired
files too, for reference.

Complete or PARTIAL: each judged file is checked against its pairwise file (given, or the
``*_pairwise.jsonl`` beside a ``*_judged.jsonl``; with ``--config`` the eval dir's): a pair with
no current verdict is ``missing``, one whose request failed an ``error``, one the judge answered
unreadably ``invalid`` (counted with the errors in the table, but not unfinished: asking again at
temperature 0 gives the same answer). ``summary.json`` says ``complete`` with the totals ``pairs``,
``judged``, ``missing``, ``errors`` and ``invalid`` (per file under
``coverage``); a summary with anything missing or errored is labelled PARTIAL in the table and
chart, and ``hhdpo judge``/``eval`` exit 75 for it. Without a pairwise file ``complete`` is null.
"""

from __future__ import annotations

import io
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from hhdpo.core import numfmt
from hhdpo.core.errors import BadInput
from hhdpo.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text, iter_jsonl
from hhdpo.evaluation.paired import paired_comparison

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


def summarize_file(path, label: Optional[str] = None, confidence: float = 0.95, records=None) -> dict:
    """One file's counts and rates; ``records`` (already read) saves reading ``path`` again."""
    records = [r for _, r in iter_jsonl(path)] if records is None else records
    c = count_verdicts(records)
    models = Counter(str(r["model_id"]) for r in records if r.get("model_id") is not None)
    judges = sorted({str(r["judge_model"]) for r in records if r.get("judge_model") is not None})
    auto = models.most_common(1)[0][0] if len(models) == 1 else Path(path).stem
    return {"file": str(path), "label": label or auto, "judge_models": judges, **c, **rates(c, confidence)}


def compare(ref: dict, other: dict, ref_records, other_records) -> dict:
    """File ``other`` against the reference: the paired sign test over shared prompts when there
    are any, else the unpaired z-test; ``test``, ``diff`` and ``p_value`` are the one that applies."""
    z, p = two_proportion_ztest(ref["wins"], ref["wins"] + ref["losses"], other["wins"], other["wins"] + other["losses"])
    diff = None if ref["win_rate"] is None or other["win_rate"] is None else ref["win_rate"] - other["win_rate"]
    unpaired = {"metric": "win_rate", "diff": diff, "z": z, "p_value": p}
    paired = paired_comparison(ref_records, other_records)
    out = {"a": ref["label"], "b": other["label"], "paired": paired, "unpaired": unpaired}
    if paired["shared"]:
        out.update(test="paired", metric="win_rate_ties_half on shared prompts", diff=paired["diff"],
                   p_value=paired["p_value"])
    else:
        out.update(test="unpaired", metric="win_rate", diff=diff, p_value=p)
    return out


def pairwise_beside(judged_file) -> Path | None:
    """``x_judged.jsonl`` -> ``x_pairwise.jsonl`` when that file exists (what ``hhdpo judge`` names)."""
    p = Path(judged_file)
    if "judged" not in p.name:
        return None
    cand = p.with_name(p.name.replace("judged", "pairwise"))
    return cand if cand.is_file() else None


def completeness(rows: list[dict]) -> dict:
    """The totals over the files whose coverage is known; ``complete`` is None when none is."""
    known = [r["coverage"] for r in rows if r.get("coverage")]
    if not known:
        return {"complete": None, "pairs": None, "judged": None, "missing": None, "errors": None, "invalid": None}
    out = {k: sum(c.get(k, 0) for c in known) for k in ("pairs", "judged", "missing", "errors", "invalid")}
    complete = all(c["complete"] for c in known)
    return {"complete": complete if complete is False or len(known) == len(rows) else None, **out}


def summarize(files, labels: Optional[list[str]] = None, confidence: float = 0.95, pairwise=None) -> dict:
    """Summarise judged files; files after the first are each compared with the first.
    ``pairwise``: each file's pairwise file (None: the one beside it, if any) for completeness."""
    from hhdpo.evaluation.judge_resume import coverage, load_pairs

    files = [str(f) for f in files]
    labels = list(labels or [])
    if len(labels) > len(files):
        raise BadInput(f"{len(labels)} labels for {len(files)} files")
    pairwise = list(pairwise or [])
    if len(pairwise) > len(files):
        raise BadInput(f"{len(pairwise)} pairwise files for {len(files)} judged files")
    pws = [pairwise[i] if i < len(pairwise) and pairwise[i] else pairwise_beside(f) for i, f in enumerate(files)]
    # a judged file the judge never started (its budget ran out first) holds no verdicts yet
    records = [[] if pw and not Path(f).exists() else [r for _, r in iter_jsonl(f)] for f, pw in zip(files, pws)]
    rows = [summarize_file(f, labels[i] if i < len(labels) else None, confidence, records[i])
            for i, f in enumerate(files)]
    for row, pw, recs in zip(rows, pws, records):
        row["pairwise_file"] = str(pw) if pw else None
        row["coverage"] = coverage(load_pairs(pw), recs) if pw else None
    seen = Counter(r["label"] for r in rows)
    for r in rows:  # e.g. two runs both called policy_model: disambiguate by file
        if seen[r["label"]] > 1:
            r["label"] = f"{r['label']} ({Path(r['file']).stem})"
    comparisons = [compare(rows[0], rows[i], records[0], records[i]) for i in range(1, len(rows))]
    return {**completeness(rows), "confidence": confidence, "files": rows, "comparisons": comparisons}


def partial_note(summary: dict) -> str | None:
    """``PARTIAL: ...`` for a summary known to be incomplete, else None."""
    if summary.get("complete") is not False:
        return None
    return (f"PARTIAL: {summary['judged']} of {summary['pairs']} pairs judged, {summary['missing']} missing, "
            f"{summary['errors']} with judge errors; rerun the judge to finish")


# --------------------------------------------------------------------------- output


def describe_test(c: dict) -> str:
    """A comparison in words, for the chart: which test, its p-value, and on how many prompts."""
    pr = c.get("paired") or {}
    if c.get("test") == "paired":
        return (f"{c['a']} vs {c['b']}: paired exact sign test, p = {numfmt.pval(c['p_value'])}\n"
                f"{pr['shared']} shared prompts "
                f"({pr['excluded_error'] + pr['only_a'] + pr['only_b'] + pr['prompt_mismatch']} excluded): "
                f"{c['a']} better {pr['a_better']}, {c['b']} better {pr['b_better']}, same {pr['same']}")
    return f"{c['a']} vs {c['b']}: two-proportion z-test (unpaired, no shared prompts), p = {numfmt.pval(c.get('p_value'))}"


def _comparison_row(c: dict) -> str:
    un = c.get("unpaired") or {"z": c.get("z"), "p_value": c.get("p_value")}  # pre-paired summaries: all unpaired
    zp = "n/a" if un["z"] is None else f"z = {un['z']:.3f}, p = {numfmt.pval(un['p_value'])}"
    if c.get("test") == "paired":
        pr = c["paired"]
        excl = (f"{pr['excluded_error']} judge error/no verdict on one side, "
                f"{pr['only_a'] + pr['only_b']} in one file only" + (f", {pr['prompt_mismatch']} prompt differs"
                                                                       if pr["prompt_mismatch"] else ""))
        diff = "n/a" if c["diff"] is None else f"{100 * c['diff']:+.1f} pp (ties = ½)"
        return (f"| {c['a']} | {c['b']} | paired exact sign test | {pr['shared']} shared ({excl} excluded) | "
                f"{pr['a_better']} / {pr['b_better']} / {pr['same']} | {diff} | {numfmt.pval(c['p_value'])} | {zp} |")
    diff = "n/a" if c.get("diff") is None else f"{100 * c['diff']:+.1f} pp (excl. ties)"
    return (f"| {c['a']} | {c['b']} | two-proportion z-test (no shared prompts) | — | — | {diff} | "
            f"{numfmt.pval(c.get('p_value'))} | {zp} |")


def markdown(summary: dict) -> str:
    conf = f"{100 * summary['confidence']:g}%"
    note = partial_note(summary)
    lines = [f"**{note}**", ""] if note else []
    lines += [f"| model | n | wins | losses | ties | errors | win rate (excl. ties) | {conf} CI | "
             f"win rate (ties = ½) | {conf} CI | order agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in summary["files"]:
        lines.append(f"| {r['label']} | {r['n']} | {r['wins']} | {r['losses']} | {r['ties']} | {r['errors']} | "
                     f"{numfmt.pct(r['win_rate'])} | {numfmt.ci(r['win_rate_ci'])} | {numfmt.pct(r['win_rate_ties_half'])} | "
                     f"{numfmt.ci(r['win_rate_ties_half_ci'])} | {numfmt.pct(r['agreement_rate'])} |")
    if summary["comparisons"]:
        lines += ["", "| A | B | test | prompts | A better / B better / same | difference (A − B) | p-value | "
                      "unpaired z-test (reference) |",
                  "|---|---|---|---|---:|---:|---:|---|"]
        lines += [_comparison_row(c) for c in summary["comparisons"]]
        lines += ["", "Paired: per prompt, win = 1, tie = ½, loss = 0 against the HH chosen response; A better or "
                      "B better when the two differ; exact two-sided binomial test (p = ½) on those discordant "
                      "prompts. Difference: mean of the per-prompt scores' difference over the shared prompts."]
    return "\n".join(lines)


def draw_winrates(ax, summary: dict) -> None:
    """Both win rates per file with CI error bars, and each comparison's test under the axis."""
    rows = summary["files"]
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
    ax.set_xticks(range(len(rows)), [f"{r['label']}\n({r['wins'] + r['losses'] + r['ties']} verdicts)" for r in rows])
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"win rate vs HH chosen (%)\n{100 * summary['confidence']:g}% Wilson CI")
    note = partial_note(summary)
    if note:
        ax.set_title(f"PARTIAL: win rate against the HH chosen responses\n{summary['judged']} of "
                     f"{summary['pairs']} pairs judged, {summary['missing']} missing, {summary['errors']} with errors",
                     color="tab:red")
    else:
        ax.set_title("Win rate against the HH chosen responses")
    ax.legend(loc="upper right")
    tests = [describe_test(c) for c in summary.get("comparisons", [])]
    if tests:
        ax.set_xlabel("\n".join(tests), fontsize=8)


def plot_png(summary: dict, out_png) -> None:
    """Bar chart of both win rates with CI error bars (Agg, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.6 * len(summary["files"]) + 2), 4.5))
    FigureCanvasAgg(fig)
    draw_winrates(fig.add_subplot(), summary)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(out_png, buf.getvalue())


def write_outputs(summary: dict, out_dir, log=print) -> list[Path]:
    """``summary.json``, ``summary.md`` and ``summary.png`` in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / "summary.json", out_dir / "summary.md", out_dir / "summary.png"]
    atomic_write_json(paths[0], summary)
    atomic_write_text(paths[1], markdown(summary) + "\n")
    plot_png(summary, paths[2])
    note = partial_note(summary)
    log(f"[summarize] wrote {', '.join(map(str, paths))}" + (f" ({note})" if note else ""))
    return paths


def model_names(cfg, names: Optional[list[str]]) -> list[str]:
    """``--models`` as in ``hhdpo eval``: policy, base, names from HH_test.models, ``all``, or
    ``NAME=PATH`` (the judged file is ``<NAME>_judged.jsonl``); default policy, base."""
    out: list[str] = []
    for n in names or ["policy", "base"]:
        for m in (["policy", "base", *cfg.HH_test.models] if n == "all" else [n.split("=", 1)[0].strip()]):
            if m and m not in out:
                out.append(m)
    return out


def cli(argv: list[str]) -> int:
    from hhdpo.core.config import run_paths
    from hhdpo.core.stage import StageParser, load_stage_config, run_stage

    p = StageParser(
        "hhdpo summarize",
        "Win/loss/tie vs HH chosen per judged file (via winner_model_vs_chosen), Wilson CIs, and each file\n"
        "against the first (e.g. policy vs base): exact paired sign test over shared prompts, else a\n"
        "two-proportion z-test. With --config and no files: <eval dir>/<model>_judged.jsonl for --models,\n"
        "written to summary.json/md/png there.", config_required=False, overrides=False,
        config_help="YAML config (a run's saved config.yaml works); with no files, summarize its eval outputs")
    p.add_argument("files", nargs="*", metavar="FILE | key.path=value",
                   help="judged JSONL files (the first is the reference), and config overrides, in any order")
    p.flag("in_file", nargs="+", action="extend", default=[], help="judged JSONL file(s), same as positional")
    p.flag("label", nargs="+", action="extend", default=[],
           help="display name per file, in order (default: the files' model_id, or the model names)")
    p.flag("models", help="with --config and no files: comma-separated model names (default: policy,base)")
    p.flag("out_json", default=None, help="write the summary as JSON here (default with --config: <eval dir>/summary.json)")
    p.flag("out_png", default=None, help="write a bar chart with CI error bars here (default with --config: <eval dir>/summary.png)")
    p.flag("confidence", type=float, default=0.95, help="CI level (default: 0.95)")
    args = p.parse(argv)
    files = args.files + args.in_file
    if not files and args.config is None and not args.overrides:
        p.error("give judged files, or --config to summarize a run's eval outputs")
    if not 0 < args.confidence < 1:
        p.error("--confidence must be in (0, 1)")

    def body() -> None:
        out_md = None
        labels = args.label
        pairwise = None
        if files:
            judged = files
        else:
            cfg = load_stage_config(args)
            names = model_names(cfg, args.models.split(",") if args.models else None)
            ev = run_paths(cfg).eval
            judged = [ev / f"{n}_judged.jsonl" for n in names]
            pairwise = [p if p.is_file() else None for p in (ev / f"{n}_pairwise.jsonl" for n in names)]
            labels = labels or names
            args.out_json = args.out_json or ev / "summary.json"
            args.out_png = args.out_png or ev / "summary.png"
            out_md = ev / "summary.md"
        summary = summarize(judged, labels, args.confidence, pairwise)
        table = markdown(summary)
        print(table)
        if partial_note(summary):
            print(f"hhdpo summarize: {partial_note(summary)}", file=sys.stderr)
        for path, write in ((args.out_json, lambda f: atomic_write_json(f, summary)),
                            (out_md, lambda f: atomic_write_text(f, table + "\n")),
                            (args.out_png, lambda f: plot_png(summary, f))):
            if path:
                write(path)
                print(f"wrote {path}", file=sys.stderr)

    return run_stage("hhdpo summarize", body)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
