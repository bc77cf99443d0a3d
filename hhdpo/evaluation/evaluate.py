"""``hhdpo eval``: generate -> pairwise -> judge -> summarize, in one go.

    hhdpo eval --config runs/smollm2-dpo/config.yaml            # policy (save_dir) and base (ref_model)
    hhdpo eval --config cfg.yaml --models policy,beta0.05        # any models named in HH_test.models
    OPENAI_API_KEY=... hhdpo eval --config cfg.yaml judge.model=gpt-4o-mini

Every stage resumes, so rerunning after a crash or preemption redoes only missing work.
A judge that stops on its budget (judge.max_requests / max_tokens) or leaves verdicts with
judge_error still writes the summary, labelled PARTIAL with the counts (summary.json:
``"complete": false``, ``judged``, ``missing``, ``errors``), and ``hhdpo eval`` exits 75
(incomplete); a rerun judges only the missing and errored pairs and completes it (exit 0).
Outputs go to ``eval.out_dir``: ``<name>_pairwise.jsonl``, ``<name>_judged.jsonl``,
``summary.json``, ``summary.md`` and ``summary.png``; generations go where
``HH_test`` says. With no ``OPENAI_API_KEY`` and no ``judge.base_url`` the judge is a
local vLLM server for ``judge.serve_model`` (offline default).
"""

from __future__ import annotations

import sys

from hhdpo.core.config import Config, run_paths, save_config
from hhdpo.core.errors import EXIT_INCOMPLETE, EXIT_OK


def evaluate(cfg: Config, models: list[str] | None = None, log=print) -> dict:
    """Run the evaluation chain for ``models`` (default policy and base); returns the summary
    (``summary["complete"]`` is False when the judge left pairs missing or errored)."""
    from hhdpo.evaluation.generate import generate, select_models
    from hhdpo.evaluation.judge import JudgeSettings, judge_run
    from hhdpo.evaluation.pairwise import pairwise_run
    from hhdpo.evaluation.report import write_report_or_warn
    from hhdpo.evaluation.summarize import markdown, summarize, write_outputs

    out_dir = run_paths(cfg).eval
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir, "eval_config.yaml", log=log)

    gen_files = generate(cfg, select_models(cfg, models), log=log)
    names = list(gen_files)
    pair_files = list(pairwise_run(cfg, names, log=log).values())
    judged_files = [out_dir / f"{n}_judged.jsonl" for n in names]

    run = judge_run(JudgeSettings(cfg.judge), pair_files, judged_files, log=log,
                    server_log=out_dir / "judge_server.log")
    if run.budget_hit:
        log(f"[eval] judge budget hit ({run.budget_hit}); summary covers the verdicts so far")

    summary = summarize(judged_files, labels=names, pairwise=pair_files)
    print(markdown(summary))
    write_outputs(summary, out_dir, log=log)
    write_report_or_warn(cfg, log=log)
    return summary


def cli(argv: list[str] | None = None) -> int:
    from hhdpo.core.stage import StageParser, load_stage_config, run_stage
    from hhdpo.evaluation.judge import INCOMPLETE_HELP
    from hhdpo.evaluation.summarize import partial_note

    ap = StageParser("hhdpo eval", __doc__, config_help="YAML config (a run's saved config.yaml works)",
                     epilog=INCOMPLETE_HELP)
    ap.flag("models", metavar="NAMES",
            help="comma-separated: policy, base and/or names from HH_test.models (default: policy,base)")
    ap.key_flag("backend", "HH_test.backend", help="generation backend: vllm or transformers")
    args = ap.parse(argv)

    def body() -> int:
        cfg = load_stage_config(args)
        summary = evaluate(cfg, args.models.split(",") if args.models else None)
        if summary.get("complete") is False:
            print(f"hhdpo eval: INCOMPLETE (exit {EXIT_INCOMPLETE}): {partial_note(summary)}", file=sys.stderr)
            return EXIT_INCOMPLETE
        return EXIT_OK

    return run_stage("hhdpo eval", body)


if __name__ == "__main__":
    sys.exit(cli())
