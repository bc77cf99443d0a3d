"""One command-line convention for every stage, and one mapping from errors to exit codes.

    hhdpo <stage> --config FILE [key.path=value ...] [--flag ...]

- ``--config`` names a YAML config (a run's saved ``config.yaml`` works); ``key.path=value``
  overrides any config key. Options and overrides may come in any order
  (``parse_intermixed_args``).
- A flag that stands for a config key (``hhdpo judge --model X`` is ``judge.model=X``) is an
  alias of that key; a flag wins over a ``key=value`` for the same key.
- Every flag has an underscore and a hyphen spelling (``--in_file`` / ``--in-file``, the
  seed's spelling first); ``--help`` lists both once.
- Exit codes (:mod:`hhdpo.core.errors`): 0 done, 2 bad config or input, 42 preempted, 1 anything
  unexpected (with a traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from typing import Callable, Optional

from hhdpo.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_UNEXPECTED,
    BadInput,
    Preempted,
)

# every stage: its module (which exposes ``cli(argv) -> int``) and what it does; imported by name
STAGES = {
    "train": ("hhdpo.train", "train a DPO policy with FSDP2 (launches torchrun when needed)"),
    "data": ("hhdpo.data.hh", "show how HH pairs parse and render; parse/skip counts"),
    "generate": ("hhdpo.evaluation.generate", "generate policy/base responses to HH test prompts (vLLM)"),
    "pairwise": ("hhdpo.evaluation.pairwise", "build A/B pairwise files against HH chosen responses"),
    "judge": ("hhdpo.evaluation.judge", "judge pairwise files with an LLM judge (OpenAI-compatible)"),
    "summarize": ("hhdpo.evaluation.summarize", "win/loss/tie with Wilson CIs, table, JSON and chart"),
    "eval": ("hhdpo.evaluation.evaluate", "generate -> pairwise -> judge -> summarize in one go"),
    "upload": ("hhdpo.upload", "upload the model and logs to the Hugging Face Hub"),
    "submit": ("hhdpo.submit", "submit train|eval|pipeline|sweep as submitit jobs (SLURM, or locally)"),
    "report": ("hhdpo.evaluation.report", "report.png + report.html: training curves, tail test, eval win rates"),
    "plan": ("hhdpo.launch.plan", "size a run: schedule, GPU memory, host RAM, time, SLURM attempts, sbatch options"),
}

_OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w.]*=")
EXIT_CODES_HELP = ("exit status: 0 done, 2 bad config or input (the message names the key, file or line), "
                   "42 preempted (checkpoint saved; requeue), 1 anything unexpected, 130 interrupted")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--in_file, --in-file FILE`` instead of repeating the metavar after each spelling."""

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return ", ".join(action.option_strings) + " " + self._format_args(action, self._get_default_metavar_for_optional(action))


def spellings(name: str) -> list[str]:
    """``in_file`` -> ``['--in_file', '--in-file']`` (one entry when both are the same)."""
    name = name.lstrip("-")
    out = [f"--{name}"]
    for alt in (name.replace("_", "-"), name.replace("-", "_")):
        if f"--{alt}" not in out:
            out.append(f"--{alt}")
    return out


class _KeyAlias(argparse.Action):
    """Record ``--flag value`` as the override ``key=value``."""

    def __init__(self, option_strings, dest, key: str, **kw):
        self.key = key
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, ns, values, option_string=None):
        if isinstance(values, bool):
            values = "true" if values else "false"
        getattr(ns, "key_flags").append(f"{self.key}={values}")


class _BoolKeyAlias(_KeyAlias):
    """``--both-orders`` / ``--no-both-orders`` for a boolean config key."""

    def __init__(self, option_strings, dest, key: str, **kw):
        opts = list(option_strings)
        for o in option_strings:  # argparse's own --no-shuffle_ab, plus --no-shuffle-ab and --no_shuffle_ab
            for neg in ("--no-" + o[2:], "--no_" + o[2:] if "_" in o else None):
                if neg and neg not in opts:
                    opts.append(neg)
        super().__init__(opts, dest, key, nargs=0, **kw)

    def __call__(self, parser, ns, values, option_string=None):
        super().__call__(parser, ns, not option_string.startswith(("--no-", "--no_")), option_string)

    def format_usage(self):
        return " | ".join(self.option_strings)


class StageParser(argparse.ArgumentParser):
    """argparse with ``--config``, ``key=value`` overrides and key-alias flags."""

    def __init__(self, prog: str, description: str | None = None, *, config_required: bool = True,
                 config_help: str = "YAML config (a run's saved config.yaml works)", epilog: str | None = None,
                 overrides: bool = True):
        epilog = f"{epilog}\n\n{EXIT_CODES_HELP}" if epilog else EXIT_CODES_HELP
        super().__init__(prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter)
        self.set_defaults(key_flags=[])
        self.add_argument("--config", required=config_required, metavar="FILE", help=config_help)
        if overrides:
            self.add_argument("overrides", nargs="*", metavar="key.path=value",
                              help="config overrides, in any order with the options")

    def flag(self, name: str, **kw) -> argparse.Action:
        """A plain option under both spellings (``dest`` is the underscore name)."""
        kw.setdefault("dest", name.lstrip("-").replace("-", "_"))
        return self.add_argument(*spellings(name), **kw)

    def key_flag(self, name: str, key: str, *, boolean: bool = False, help: str = "", **kw) -> argparse.Action:
        """An option that sets config key ``key`` (shown in the help as ``= key``)."""
        help = f"{help} (= {key})" if help else f"= {key}"
        dest = "_key_" + key.replace(".", "_")
        if boolean:
            return self.add_argument(*spellings(name), action=_BoolKeyAlias, key=key, dest=dest, help=help,
                                     default=argparse.SUPPRESS)
        kw.setdefault("metavar", name.lstrip("-").replace("-", "_").upper())
        return self.add_argument(*spellings(name), action=_KeyAlias, key=key, dest=dest, help=help,
                                 default=argparse.SUPPRESS, **kw)

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        """Parse with options and positionals intermixed; ``ns.overrides`` includes the key flags last."""
        ns = self.parse_intermixed_args(argv)
        moved = []
        for a in self._actions:  # `--in_file a.jsonl judge.model=x`: the override is not a file
            vals = getattr(ns, a.dest, None) if a.nargs in ("+", "*") and a.dest != "overrides" else None
            if isinstance(vals, list):
                setattr(ns, a.dest, [v for v in vals if not _OVERRIDE_RE.match(str(v))])
                moved += [v for v in vals if _OVERRIDE_RE.match(str(v))]
        ns.overrides = list(getattr(ns, "overrides", None) or []) + moved + ns.key_flags
        return ns


def load_stage_config(ns: argparse.Namespace):
    """The config for a parsed command line (defaults when no ``--config``)."""
    from hhdpo.core.config import load_config

    return load_config(ns.config, ns.overrides)


def run_stage(prog: str, body: Callable[[], Optional[int]]) -> int:
    """Run a stage body and map its outcome onto the documented exit codes."""
    from hhdpo.core.config import redact

    try:
        rc = body()
        return EXIT_OK if rc is None else rc
    except BadInput as e:
        print(f"{prog}: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as e:
        print(f"{prog}: preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - the documented "anything unexpected" code, with the traceback
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        print(f"{prog}: unexpected error (exit {EXIT_UNEXPECTED}); the traceback above says where", file=sys.stderr)
        return EXIT_UNEXPECTED
