"""``hhdpo <stage> ...``: one console script, one subcommand per stage.

Each stage module owns its argument parser and exposes ``cli(argv) -> int``; this file
only dispatches, so ``hhdpo train`` and ``python -m hhdpo.train`` are the same code.
"""

from __future__ import annotations

import importlib
import sys

from hhdpo.core.stage import STAGES


def _usage() -> str:
    lines = ["usage: hhdpo <stage> [options]   (hhdpo <stage> --help for a stage's options)", "", "stages:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from hhdpo import __version__

        print(__version__)
        sys.exit(0)
    stage = argv[0]
    if stage not in STAGES:
        print(f"hhdpo: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    if stage == "train":
        from hhdpo.core.distenv import hold_stop_signals

        hold_stop_signals()  # before torch is imported: a preemption during start-up still checkpoints
        from hhdpo.train import main as train_main

        train_main(argv[1:])  # exits (a worker without the interpreter's finalization)
    module = importlib.import_module(STAGES[stage][0])
    sys.exit(module.cli(argv[1:]))  # every stage returns the exit codes of hhdpo.core.errors
