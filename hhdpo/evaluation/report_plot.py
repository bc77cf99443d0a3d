"""The run report's figure: training curves, the tail test and the eval win rates.

Six panels share the optimizer-step axis (loss, reward accuracy, reward margins, grad norm
and LR, margin quantiles with tau, p_hat against delta with beta); the win-rate chart of
:mod:`hhdpo.evaluation.summarize` and the key numbers go below them. A panel whose data is missing says
so on the panel.
Drawn with the Agg canvas (no pyplot global state: safe inside a training process).
"""

from __future__ import annotations

import io
import textwrap

from hhdpo.core.runlog import RunLogs, series

PANELS = ("Loss", "Reward accuracy", "Reward margins", "Grad norm and learning rate",
          "Tail test: margin quantiles and tau", "Tail test: exceedance p_hat vs delta, and beta",
          "Win rate vs HH chosen", "Key numbers")
TRAIN, EVAL = "tab:blue", "tab:orange"


def _note(ax, text: str, centre: bool = True) -> str:
    """Write ``text`` on the panel (centred when the panel has nothing else); returns it for the page."""
    if centre:
        ax.set_yticks([])  # an empty panel's 0..1 scale would read as data
        ax.text(0.5, 0.5, textwrap.fill(text, 60), transform=ax.transAxes, ha="center", va="center",
                fontsize=9, color="dimgray")
    else:
        ax.text(0.01, 0.02, textwrap.fill(text, 70), transform=ax.transAxes, ha="left", va="bottom",
                fontsize=7.5, color="dimgray")
    return text


def _train_eval(ax, logs: RunLogs, key: str, ylabel: str) -> list[str]:
    """One metric's training line and validation points (``eval/<key>``)."""
    notes = []
    tx, ty = series(logs.train, key)
    ex, ey = series(logs.evals, f"eval/{key}")
    if tx:
        ax.plot(tx, ty, color=TRAIN, marker="." if len(tx) < 50 else None, label="train")
    if ex:
        ax.plot(ex, ey, color=EVAL, marker="o", label="validation")
    ax.set_ylabel(ylabel)
    if not tx and not ex:
        return [_note(ax, f"no '{key}' or 'eval/{key}' in metrics.jsonl")]
    if not tx:
        notes.append(_note(ax, f"no training '{key}' records", centre=False))
    if not ex:
        notes.append(_note(ax, f"no validation 'eval/{key}' records yet", centre=False))
    ax.legend(loc="best", fontsize=8)
    return notes


def _margins(ax, logs: RunLogs) -> list[str]:
    notes = _train_eval(ax, logs, "rewards/margins", "reward margin\n(chosen - rejected)")
    for key, style in (("rewards/chosen", "--"), ("rewards/rejected", ":")):
        xs, ys = series(logs.train, key)
        if xs:
            ax.plot(xs, ys, color="grey", ls=style, lw=1, label=f"train {key.split('/')[1]} reward")
    if logs.train or logs.evals:
        ax.axhline(0, color="black", lw=0.5)
        ax.legend(loc="best", fontsize=8)
    return notes


def _grad_lr(ax, logs: RunLogs) -> list[str]:
    gx, gy = series(logs.train, "grad_norm")
    lx, ly = series(logs.train, "lr")
    if gx:
        ax.plot(gx, gy, color="tab:green", marker="." if len(gx) < 50 else None, label="grad norm (before clipping)")
    ax.set_ylabel("grad norm", color="tab:green")
    lines = ax.get_lines()
    if lx:
        from matplotlib.ticker import FuncFormatter

        ax2 = ax.twinx()
        ax2.plot(lx, ly, color="tab:purple", label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:purple")
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))  # no offset text over the legend
        lines = lines + ax2.get_lines()
    if not gx and not lx:
        return [_note(ax, "no 'grad_norm' or 'lr' in metrics.jsonl")]
    _legend_above(ax, lines)
    return [] if gx and lx else [_note(ax, f"no '{'lr' if gx else 'grad_norm'}' in metrics.jsonl", centre=False)]


def _legend_above(ax, lines) -> None:
    """A twin-axis panel's legend, between its title and the plot: "best" would avoid one axis's lines only."""
    ncol = 3 if len(lines) <= 3 else 2
    rows = -(-len(lines) // ncol)
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower left", bbox_to_anchor=(0, 1), ncol=ncol, fontsize=8,
              frameon=False, borderaxespad=0.1, handlelength=1.5)
    ax.set_title(ax.get_title(loc="left"), loc="left", fontsize=11, pad=6 + 14 * rows)


def _warmup_line(ax, logs: RunLogs) -> None:
    if logs.warmup_end:
        ax.axvline(logs.warmup_end["step"], color="grey", ls=":", lw=1, label="tail-test warmup end")


def _quantiles(ax, logs: RunLogs) -> list[str]:
    ax.set_ylabel("DPO margin M")
    if not logs.margins:
        return [_note(ax, "no margins log (global_margins_log.jsonl): tail test off or not run yet")]
    xs, p10 = series(logs.margins, "p10")
    _, med = series(logs.margins, "median")
    _, p90 = series(logs.margins, "p90")
    ax.fill_between(xs, p10, p90, color="tab:blue", alpha=0.2, label="p10 - p90 of the step's margins")
    ax.plot(xs, med, color="tab:blue", label="median margin")
    tx, tau = series(logs.tail, "tau")
    if tx:
        ax.plot(tx, tau, color="tab:red", marker="." if len(tx) < 50 else None, label="tau (EMA threshold)")
    if logs.warmup_end:
        ax.plot([logs.warmup_end["step"]], [logs.warmup_end["tau_0"]], "o", color="tab:red", label="tau_0 (warmup end)")
    _warmup_line(ax, logs)
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(loc="best", fontsize=8)
    return [] if tx or logs.warmup_end else [_note(ax, "no tau yet (still in the tail-test warmup)", centre=False)]


def _exceedance(ax, logs: RunLogs, delta: float | None, adaptive: bool) -> list[str]:
    ax.set_ylabel("p_hat = P(M > tau)")
    px, ph = series(logs.tail, "p_hat")
    if not px:
        return [_note(ax, "no tail-test p_hat yet (tail test off, or still in its warmup)")]
    ax.plot(px, ph, color="tab:red", marker="." if len(px) < 50 else None, label="p_hat")
    over = [(r["step"], r["p_hat"]) for r in logs.tail if r.get("risk_over") and isinstance(r.get("p_hat"), (int, float))]
    if over:
        ax.plot(*zip(*over), "x", color="black", label="p_hat > delta (risk over)")
    if delta is not None:
        ax.axhline(delta, color="tab:red", ls="--", lw=1, label=f"delta = {delta:g}")
    _warmup_line(ax, logs)
    bx, beta = series(logs.tail, "beta")
    notes = []
    if not adaptive:  # said in the legend: a corner note would sit on the delta line
        notes.append(f"beta fixed at {beta[-1]:g} (tail_test.adaptive_beta off)" if bx else "beta fixed")
        ax.plot([], [], " ", label=f"beta = {beta[-1]:g} (fixed)" if bx else "beta fixed")
    lines = ax.get_lines()
    if adaptive and bx:
        ax2 = ax.twinx()
        ax2.plot(bx, beta, color="tab:brown", marker="." if len(bx) < 50 else None, label="beta (adaptive)")
        ax2.set_ylabel("beta", color="tab:brown")
        lines = lines + ax2.get_lines()
    _legend_above(ax, lines)
    return notes


def _winrates(ax, logs: RunLogs) -> list[str]:
    if not logs.summary:
        ax.set_axis_off()
        return [_note(ax, "no eval yet: the win-rate chart appears once `hhdpo eval` has written summary.json")]
    from hhdpo.evaluation.summarize import draw_winrates

    draw_winrates(ax, logs.summary)
    ax.set_title("", loc="left")  # draw_winrates titles it
    return []


def _numbers(ax, numbers) -> list[str]:
    ax.set_axis_off()
    if not numbers:
        return [_note(ax, "nothing logged yet")]
    text = "\n".join(textwrap.fill(f"{k}: {v}", 80, subsequent_indent="    ") for k, v in numbers)
    ax.text(0, 1, text, transform=ax.transAxes, ha="left", va="top", fontsize=8.5, family="monospace")
    return []


def report_png(logs: RunLogs, title: str, delta: float | None = None, adaptive: bool = False,
               numbers: list[tuple[str, str]] = (), dpi: int = 100) -> tuple[bytes, dict]:
    """Draw the report. Args: the run's logs, a title, tail_test.delta (None: tail test off) and
    adaptive_beta, and (name, value) key numbers for the last panel.
    Returns the PNG bytes and, per panel name, the notes written on it (missing pieces)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 17), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(4, 2, height_ratios=[1, 1, 1, 1.15])
    first = fig.add_subplot(grid[0, 0])
    axes = [first] + [fig.add_subplot(grid[i // 2, i % 2], sharex=first) for i in range(1, 6)]
    axes += [fig.add_subplot(grid[3, 0]), fig.add_subplot(grid[3, 1])]
    draws = (lambda ax: _train_eval(ax, logs, "loss", "DPO loss"),
             lambda ax: _train_eval(ax, logs, "rewards/accuracies", "reward accuracy\n(chosen reward > rejected)"),
             lambda ax: _margins(ax, logs), lambda ax: _grad_lr(ax, logs), lambda ax: _quantiles(ax, logs),
             lambda ax: _exceedance(ax, logs, delta, adaptive), lambda ax: _winrates(ax, logs),
             lambda ax: _numbers(ax, numbers))
    notes = {}
    for name, ax, draw in zip(PANELS, axes, draws):
        ax.set_title(name, fontsize=11, loc="left")
        notes[name] = draw(ax)
    from matplotlib.ticker import MaxNLocator

    first.xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by the six step panels
    for ax in axes[:6]:
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=True)
    for ax in axes[4:6]:
        ax.set_xlabel("optimizer step")
    if not any(ax.has_data() for ax in axes[:6]):
        first.set_xlim(0, 1)
    fig.suptitle(title, fontsize=13)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue(), notes
