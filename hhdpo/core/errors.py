"""Exit codes and the error classes behind them, the same for every stage.

    0   done
    1   anything unexpected (a bug, a crashed library): traceback printed
    2   bad config or input: the message names the key, file or line; nothing was changed
    42  preempted: a checkpoint was saved; requeue the job and it resumes
    75  incomplete: the stage stopped short (the judge's budget, verdicts left as errors); what it
        finished is kept and labelled partial; rerun it to finish (EX_TEMPFAIL)
    130 interrupted from the keyboard (Ctrl-C); finished work is kept

``hhdpo <stage>``, ``python -m hhdpo.<stage>``, the Makefile, the sbatch scripts and the
submitit launchers all return these codes.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 42
EXIT_INCOMPLETE = 75  # EX_TEMPFAIL (3 is requeue-decision's "do not requeue" in hhdpo.launch.slurm)
EXIT_INTERRUPTED = 130


class BadInput(ValueError):
    """Bad config or input; the message names the key, file or line. Exits 2."""


class Preempted(Exception):
    """A signal asked the job to stop; a checkpoint was saved. Exits 42."""


def exit_meaning(code: int) -> str:
    """A stage's exit code in words (for the submitit jobs' errors)."""
    return {EXIT_OK: "done", EXIT_UNEXPECTED: "unexpected error", EXIT_BAD_INPUT: "bad config or input",
            EXIT_PREEMPTED: "preempted, checkpoint saved", EXIT_INTERRUPTED: "interrupted",
            EXIT_INCOMPLETE: "incomplete, rerun to finish"}.get(code, "unknown")
