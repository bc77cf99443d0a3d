"""``hhdpo report``: one picture and one page per run, for people to look at.

    hhdpo report runs/smollm2-dpo                       # a training save_dir holding config.yaml
    hhdpo report --config runs/smollm2-dpo/config.yaml [key.path=value ...]

Writes ``report.png`` (training curves, tail test, eval win rates: :mod:`hhdpo.evaluation.report_plot`)
and ``report.html`` (the PNG embedded as base64, so the page is one self-contained file,
plus the key numbers as text) into the save_dir. ``train`` (rank 0) and ``eval`` call
:func:`write_report_or_warn` when they finish. Missing pieces are noted, not errors; an empty or
malformed log is a DataError naming ``file:line`` (exit 2).
"""

from __future__ import annotations

import base64
import html
import sys
import time
from pathlib import Path

from hhdpo.core import numfmt
from hhdpo.core.runlog import RunLogs, read_run


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def key_numbers(logs: RunLogs, delta: float | None = None) -> list[tuple[str, str]]:
    """(name, value) rows for the page: status, last training and validation records, the tail
    test, and the eval win rates and tests (only those the run has)."""
    rows = []
    if logs.state:
        s = logs.state
        # run_state.json is written at start (step = the resume step) and at the end, not per step
        rows.append(("training status", f"running (started at step {s.get('step')}, {s.get('total_steps')} steps planned)"
                     if s.get("status") == "running" else f"{s.get('status')} at step {s.get('step')} of {s.get('total_steps')}"))
    if logs.train:
        r = logs.train[-1]
        rows.append((f"training (step {r['step']}, last log window)",
                     f"loss {_g(r.get('loss'))}, reward accuracy {_g(r.get('rewards/accuracies'))}, "
                     f"reward margin {_g(r.get('rewards/margins'))}"))
    if logs.evals:
        r = logs.evals[-1]
        rows.append((f"validation (step {r['step']}, {r.get('eval/n', '?')} pairs)",
                     f"loss {_g(r.get('eval/loss'))}, reward accuracy {_g(r.get('eval/rewards/accuracies'))}, "
                     f"reward margin {_g(r.get('eval/rewards/margins'))}"))
    if logs.warmup_end:
        rows.append(("tail-test warmup", f"ended at step {logs.warmup_end['step']}, tau_0 = {_g(logs.warmup_end.get('tau_0'))}"))
    if logs.tail:
        r = logs.tail[-1]
        over = sum(bool(t.get("risk_over")) for t in logs.tail)
        rows.append((f"tail test (step {r['step']})",
                     f"tau = {_g(r.get('tau'))}, p_hat = {_g(r.get('p_hat'))} (delta = {_g(delta)}), beta = {_g(r.get('beta'))}; "
                     f"p_hat > delta on {over} of {len(logs.tail)} steps after warmup"))
    if logs.summary:
        from hhdpo.evaluation.summarize import partial_note

        if partial_note(logs.summary):
            rows.append(("eval (PARTIAL)", partial_note(logs.summary)))
        conf = f"{100 * logs.summary.get('confidence', 0.95):g}%"
        for f in logs.summary["files"]:
            bounds = f.get("win_rate_ci") or (None, None)
            ci = "" if bounds[0] is None else " " + numfmt.ci(bounds)
            rows.append((f"win rate vs HH chosen: {f.get('label')}",
                         f"{numfmt.pct(f.get('win_rate'))}{ci} excl. ties ({conf} Wilson CI), {numfmt.pct(f.get('win_rate_ties_half'))} "
                         f"with ties as half; {f.get('wins')}/{f.get('losses')}/{f.get('ties')} win/loss/tie, "
                         f"{f.get('errors')} judge errors"))
        from hhdpo.evaluation.summarize import describe_test

        for c in logs.summary.get("comparisons", []):
            rows.append(("eval comparison", describe_test(c).replace("\n", "; ")))
    return rows


def html_page(title: str, png: bytes, numbers: list[tuple[str, str]], panel_notes: dict, notes: list[str]) -> str:
    """A self-contained page: the key numbers, the PNG inline (base64), each panel with its notes."""
    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in numbers) or \
        "<tr><td>nothing logged yet</td></tr>"
    panels = "".join(f"<li>{e(name)}" + "".join(f" <em>({e(n)})</em>" for n in ns) + "</li>"
                     for name, ns in panel_notes.items())
    missing = "".join(f"<li>{e(n)}</li>" for n in notes)
    img = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}}
img{{max-width:100%}}em{{color:#666}}</style></head>
<body><h1>{e(title)}</h1>
<p>Written {e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by <code>hhdpo report</code>.</p>
<h2>Key numbers</h2><table>{rows}</table>
{f'<h2>Missing pieces</h2><ul>{missing}</ul>' if missing else ''}
<h2>Panels</h2><ol>{panels}</ol>
<img alt="run report: {e(', '.join(panel_notes))}" src="data:image/png;base64,{img}">
</body></html>
"""


def write_report(cfg, log=print) -> Path:
    """Write ``report.png`` and ``report.html`` into ``run_paths(cfg).save``; returns the HTML path.

    Raises DataError for an empty or malformed log (file:line); missing pieces are notes."""
    from hhdpo.core.config import run_paths
    from hhdpo.core.io import atomic_write_bytes, atomic_write_text
    from hhdpo.evaluation.report_plot import report_png

    save = run_paths(cfg).save
    logs = read_run(cfg)
    t, tail = cfg.dpo_training, cfg.tail_test
    title = f"hhdpo run {save.name}: {cfg.policy_model}, {t.loss_type} DPO, beta {t.dpo_beta:g}, lr {t.learning_rate:g}"
    delta = tail.delta if tail.enabled else None
    numbers = key_numbers(logs, delta)
    png, panel_notes = report_png(logs, title, delta, tail.adaptive_beta, numbers)
    atomic_write_bytes(save / "report.png", png)
    page = save / "report.html"
    atomic_write_text(page, html_page(title, png, numbers, panel_notes, logs.notes))
    log(f"[report] wrote {page} and {save / 'report.png'}")
    return page


def write_report_or_warn(cfg, log=print) -> Path | None:
    """:func:`write_report` at the end of ``train`` (rank 0) and ``eval``: a report that cannot be
    drawn is logged as a warning there and returns None, never failing the finished run."""
    try:
        return write_report(cfg, log=log)
    except Exception as e:  # noqa: BLE001 - the run's own work is done and saved; the report is extra
        log(f"[report] warning: report not written ({type(e).__name__}: {e}); rerun `hhdpo report` after fixing it")
        return None


def cli(argv: list[str] | None = None) -> int:
    from hhdpo.core.config import ConfigError, load_config
    from hhdpo.core.stage import StageParser, run_stage

    p = StageParser("hhdpo report", "Write report.png and a self-contained report.html (training curves, tail test,\n"
                    "eval win rates, key numbers) into a run's save_dir.", config_required=False, overrides=False,
                    config_help="YAML config (default: RUN_DIR/config.yaml)")
    p.add_argument("run_dir", nargs="*", metavar="RUN_DIR | key.path=value",
                   help="a training save_dir holding config.yaml (the report goes there), and config overrides")
    args = p.parse(argv)
    if len(args.run_dir) > 1:
        p.error(f"one RUN_DIR, got {len(args.run_dir)}: {' '.join(args.run_dir)}")
    if not args.run_dir and args.config is None:
        p.error("give RUN_DIR (a training save_dir holding config.yaml) or --config")

    def body() -> None:
        config, overrides = args.config, list(args.overrides)
        if args.run_dir:
            d = Path(args.run_dir[0])
            if not d.is_dir():
                raise ConfigError(f"RUN_DIR {d}: not a directory")
            if config is None:
                config = d / "config.yaml"
                if not config.is_file():
                    raise ConfigError(f"{config}: not found; RUN_DIR is a training save_dir holding config.yaml "
                                      "(or give --config)")
            # the directory given is the save_dir, even when it was moved or copied since training
            overrides.insert(0, f"dpo_training.save_dir={d.resolve()}")
        write_report(load_config(config, overrides))

    return run_stage("hhdpo report", body)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
