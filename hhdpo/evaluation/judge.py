"""``hhdpo judge``: LLM-judged pairwise comparison over an OpenAI-compatible API.

    hhdpo judge --config runs/x/config.yaml [--models policy,base] [judge.model=gpt-4o ...]
    hhdpo judge --in_file a_pairwise.jsonl [--out_file a_judged.jsonl] --base-url URL --model M

Without ``--in_file`` it judges ``<eval dir>/<name>_pairwise.jsonl`` into
``<name>_judged.jsonl`` for each name in ``--models`` (the files ``hhdpo eval`` uses).
Each judged record is the pair plus::

    judge_model, judge_template, judge_key, winner (a|b|tie), winner_model_vs_chosen
    (model|chosen|tie), model_id, chosen_id, explanation, input_tokens, output_tokens
    [+ judge_error, judge_raw when the verdict failed; + verdicts, orders_agree with --both-orders]

* Verdicts are requested as structured output and parsed tolerantly (:mod:`hhdpo.evaluation.verdict`);
  a verdict that cannot be parsed, or a request that fails after all retries
  (:mod:`hhdpo.evaluation.judge_api`), is written with ``judge_error`` and ``winner: null`` so that it
  is visible but never counted as a tie.
* Resumable and crash-safe: finished verdicts are appended (whole lines, fsynced) by one
  writer; a rerun repairs a torn last line and judges only the pairs without a current
  verdict (same idx and ``judge_key``, see :mod:`hhdpo.evaluation.judge_resume`). Saved verdicts whose
  pair changed or left the pairwise file are dropped by an atomic rewrite, with a log line
  saying how many and why, and re-judged; so are saved verdicts with ``judge_error``
  (``--keep-errors`` keeps them).
* Budget caps stop new requests; finished verdicts are kept, the rest left for a rerun.
* Complete, or it says not: a run that leaves any pair without a verdict (budget hit) or with
  ``judge_error`` after all retries exits 75 (``EXIT_INCOMPLETE``, "rerun to finish") and names
  the counts; a rerun judges only what is missing or errored, then exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from hhdpo.core.config import redact
from hhdpo.core.errors import EXIT_INCOMPLETE, EXIT_OK
from hhdpo.core.io import (
    DataError,
    append_jsonl,
    atomic_write_text,
    iter_jsonl,
    repair_jsonl,
)
from hhdpo.evaluation.judge_api import (
    BudgetExhausted,
    JudgeAPI,
    JudgeFatal,
    JudgeSettings,
    RequestFailed,
    judge_endpoint,
    make_client,
    run_all,
)
from hhdpo.evaluation.judge_resume import (
    DEFAULT_MODELS,
    coverage,
    default_out_file,
    exclusive,
    judge_key,
    load_pairs,
    model_files,
    split_saved,
)
from hhdpo.evaluation.judge_stats import FileStats, RunStats  # noqa: F401 (part of judge's API)
from hhdpo.evaluation.pairwise import CHOSEN_ID
from hhdpo.evaluation.verdict import TEMPLATES, VerdictError, parse_verdict
from hhdpo.evaluation.winner import FLIP, map_winner, reconcile

# --------------------------------------------------------------------------- judging


class Judge:
    """Judges pairs into files against one endpoint (:class:`JudgeAPI`: retries, global budget)."""

    def __init__(self, client, settings: JudgeSettings, log=None):
        self.s, self.jc = settings, settings.judge
        self.template = TEMPLATES[self.jc.template]
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.api = JudgeAPI(client, settings, log=self.log)
        self.budget = self.api.budget

    async def _one_order(self, pair: dict, flipped: bool) -> dict:
        a, b = (pair["b"], pair["a"]) if flipped else (pair["a"], pair["b"])
        v = {"order": "ba" if flipped else "ab", "input_tokens": 0, "output_tokens": 0}
        try:
            text, truncated, v["input_tokens"], v["output_tokens"] = await self.api.request(
                self.template.messages(pair["prompt"], a, b))
        except RequestFailed as e:
            return {**v, "error": str(e)}
        if truncated:
            v["truncated"] = True  # hit max_output_tokens; a verdict given before the cut still counts
        try:
            raw_winner, explanation = parse_verdict(text, self.jc.template)
        except VerdictError as e:
            return {**v, "error": f"unparseable verdict: {redact(str(e))}", "raw": redact(text[:2000])}
        return {**v, "winner": FLIP[raw_winner] if flipped else raw_winner, "raw_winner": raw_winner,
                "explanation": redact(explanation)}

    async def judge_pair(self, pair: dict) -> dict:
        """Judge one pair (both orders if configured) and return the output record."""
        flips = (False, True) if self.jc.both_orders else (False,)
        results = await asyncio.gather(*(self._one_order(pair, f) for f in flips), return_exceptions=True)
        for r in results:  # budget/fatal/cancel outrank a per-pair error
            if isinstance(r, BaseException):
                raise r
        rec = dict(pair)
        rec.update(judge_model=self.jc.model, judge_template=self.jc.template,
                   judge_key=judge_key(pair, self.jc.model, self.jc.template))
        errors = [r["error"] for r in results if "error" in r]
        winner = None
        if not errors:
            winner = results[0]["winner"] if len(results) == 1 else reconcile(results[0]["winner"], results[1]["winner"])
        mvc, model_id, chosen_id = map_winner(winner, rec["a_id"], rec["b_id"], bool(rec.get("is_swapped")),
                                              self.s.chosen_id)
        rec.update(winner=winner, winner_model_vs_chosen=mvc, model_id=model_id, chosen_id=chosen_id,
                   explanation=results[0].get("explanation", ""),
                   input_tokens=sum(r["input_tokens"] for r in results),
                   output_tokens=sum(r["output_tokens"] for r in results))
        if any(r.get("truncated") for r in results):
            rec["judge_truncated"] = True
        if errors:
            rec["judge_error"] = "; ".join(errors)
            raws = [r["raw"] for r in results if "raw" in r]
            if raws:
                rec["judge_raw"] = raws[0]
        if self.jc.both_orders:
            rec["verdicts"] = results
            rec["orders_agree"] = None if errors else results[0]["winner"] == results[1]["winner"]
        return rec

    # ---- one file

    def _check_resumable(self, out_path: Path, saved: list[dict]) -> None:
        """Another judge or protocol in the same file is a mistake, not staleness: refuse
        rather than throw away (possibly paid-for) verdicts."""
        for r in saved:
            for key, want in (("judge_model", self.jc.model), ("judge_template", self.jc.template)):
                if key in r and r[key] != want:
                    raise DataError(f"{out_path}: already holds verdicts with {key}={r[key]!r}, this run uses "
                                    f"{want!r}; pick another --out_file (or delete it) to avoid mixing judges")
            if ("verdicts" in r) != self.jc.both_orders:
                raise DataError(f"{out_path}: was judged {'with' if 'verdicts' in r else 'without'} "
                                "--both-orders; pick another --out_file to avoid mixing protocols")

    def _resume(self, in_file, out_path: Path, pairs: list[dict]) -> tuple[set, Counter]:
        """The idx with a current saved verdict; stale ones are dropped from the file (atomically)."""
        saved = repair_jsonl(out_path)  # cuts a torn last line from a killed run
        self._check_resumable(out_path, saved)
        keep, dropped = split_saved(saved, pairs, self.jc.model, self.jc.template, self.s.retry_errors)
        if dropped:
            atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
            self.log(f"{out_path}: dropped {sum(dropped.values())} saved verdict(s) to re-judge against {in_file}: "
                     + ", ".join(f"{n} {why}" for why, n in dropped.items()))
        return {r.get("idx") for r in keep}, dropped

    async def judge_file(self, in_file, out_file) -> FileStats:
        out_path = Path(out_file)
        with exclusive(out_path, log=self.log):
            st = await self._judge_file(in_file, out_path)
            # what the file holds now, read back under the lock: the run's verdict on itself
            st.coverage = coverage(load_pairs(in_file), [r for _, r in iter_jsonl(out_path)]
                                   if out_path.exists() else [])
            return st

    async def _judge_file(self, in_file, out_path: Path) -> FileStats:
        from tqdm import tqdm

        pairs = load_pairs(in_file)
        done, dropped = self._resume(in_file, out_path, pairs)
        todo = [p for p in pairs if p["idx"] not in done]
        st = FileStats(str(in_file), str(out_path), pairs=len(pairs), skipped=len(pairs) - len(todo),
                       rejudged=dict(dropped))
        if not todo:
            return st

        queue: asyncio.Queue = asyncio.Queue()
        stop = object()
        bar = tqdm(total=len(pairs), initial=st.skipped, desc=f"judging {Path(in_file).name}",
                   disable=not self.s.progress, file=sys.stderr, dynamic_ncols=True)

        async def writer():
            # One writer: whatever has finished is appended as one whole-lines write.
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                recs = [r for r in batch if r is not stop]
                if recs:
                    await asyncio.to_thread(append_jsonl, out_path, recs)
                    bar.update(len(recs))
                if stop in batch:
                    return

        it = iter(todo)

        async def worker():
            for pair in it:  # shared iterator: each pair is taken by exactly one worker
                if writer_task.done():  # the writer failed (e.g. disk full): stop paying for verdicts
                    return
                try:
                    rec = await self.judge_pair(pair)
                except BudgetExhausted:
                    return
                st.judged += 1
                st.errors += "judge_error" in rec
                st.input_tokens += rec["input_tokens"]
                st.output_tokens += rec["output_tokens"]
                if rec.get("orders_agree") is not None:
                    st.both_orders += 1
                    st.agree += rec["orders_agree"]
                queue.put_nowait(rec)

        writer_task = asyncio.create_task(writer())
        try:
            errors = await run_all([worker() for _ in range(min(self.jc.concurrency, len(todo)))])
            if errors:
                raise next((e for e in errors if isinstance(e, JudgeFatal)), errors[0]) from None
        finally:
            queue.put_nowait(stop)
            await asyncio.shield(writer_task)  # flush finished verdicts even when cancelled
            bar.close()
            st.left = len(todo) - st.judged
        return st

    async def run(self, in_files, out_files) -> RunStats:
        stats = RunStats(planned=len(in_files))
        try:
            for i, o in zip(in_files, out_files):
                st = await self.judge_file(i, o)
                stats.files.append(st)
                self.log(st.line())
                if self.budget.hit:
                    break
        finally:
            stats.requests = self.budget.requests
            stats.input_tokens, stats.output_tokens = self.budget.input_tokens, self.budget.output_tokens
            stats.budget_hit = self.budget.hit
        return stats


async def judge_files(in_files, out_files=None, settings: JudgeSettings | None = None, *,
                      client=None, keyless: bool = False, log=None) -> RunStats:
    """Judge each pairwise file into its out file (resuming) at ``settings.judge.base_url``;
    the async entry point. ``client`` defaults to :func:`make_client` (``keyless``: send no
    key); pass your own to reuse one. Budget caps apply across all files."""
    settings = settings or JudgeSettings()
    in_files = [Path(p) for p in in_files]
    out_files = [Path(p) for p in out_files] if out_files else [default_out_file(p) for p in in_files]
    if len(out_files) != len(in_files):
        raise DataError(f"{len(in_files)} in_file(s) but {len(out_files)} out_file(s)")
    resolved = [p.resolve() for p in out_files]
    if len(set(resolved)) != len(resolved) or set(resolved) & {p.resolve() for p in in_files}:
        raise DataError("each --out_file must be distinct and differ from every --in_file")
    jc = settings.judge
    own = client is None
    client = client or make_client(jc.base_url, jc.timeout, jc.api_key_env, keyless=keyless)
    try:
        return await Judge(client, settings, log=log).run(in_files, out_files)
    finally:
        if own:
            await client.close()


def judge_run(settings: JudgeSettings, in_files, out_files=None, *, log=None, server_log=None) -> RunStats:
    """Judge files with ``settings.judge``'s endpoint: the OpenAI API, ``judge.base_url``, or
    (no key, no base URL) a local vLLM judge served for this run, logging to ``server_log``."""
    for p in in_files:  # bad input fails now, not after a local judge took ~30 s to start
        load_pairs(p)
    with judge_endpoint(settings.judge, log_file=server_log) as (jc, served):
        run = dataclasses.replace(settings, judge=jc)
        return asyncio.run(judge_files(in_files, out_files, run, keyless=served, log=log))


# --------------------------------------------------------------------------- CLI

INCOMPLETE_HELP = (f"exit {EXIT_INCOMPLETE}: incomplete: the budget (judge.max_requests/max_tokens) stopped it, or "
                   "verdicts are left with judge_error after all retries; finished verdicts are kept, the summary "
                   "says PARTIAL; rerun to judge only what is missing or errored")


def build_parser():
    from hhdpo.core.stage import StageParser

    p = StageParser(
        "hhdpo judge", config_required=False,
        description="Judge pairwise JSONL files with an LLM over the OpenAI Responses (or chat) API. "
                    "Resumable: a rerun judges only the pairs without a current verdict. OPENAI_API_KEY is "
                    "sent to api.openai.com only; another judge.base_url gets $HHDPO_JUDGE_API_KEY (see "
                    "judge.api_key_env) or no key. With no OPENAI_API_KEY and no base URL a local vLLM "
                    "judge (judge.serve_model) is started.",
        epilog=INCOMPLETE_HELP)
    p.flag("in_file", nargs="+", action="extend", default=None, metavar="FILE",
           help="pairwise JSONL(s) from `hhdpo pairwise` (default: <eval dir>/<name>_pairwise.jsonl per --models)")
    p.flag("out_file", nargs="+", action="extend", default=None, metavar="FILE",
           help="judged JSONL per in_file, in order (default: *_pairwise.jsonl -> *_judged.jsonl)")
    p.flag("models", default=None, metavar="NAMES",
           help=f"without --in_file: comma-separated models to judge (default: {','.join(DEFAULT_MODELS)})")
    p.key_flag("model", "judge.model", help="judge model")
    p.key_flag("base_url", "judge.base_url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.key_flag("api", "judge.api", help="responses or chat")
    p.key_flag("template", "judge.template", help="strict (the seed's JSON evaluator) or dpo (the DPO paper's)")
    p.key_flag("concurrency", "judge.concurrency", help="requests in flight")
    p.key_flag("max_retries", "judge.max_retries", help="retries per request on 408/409/429/5xx/timeouts")
    p.key_flag("timeout", "judge.timeout", help="seconds per request")
    p.key_flag("max_requests", "judge.max_requests", help="budget: stop cleanly after this many requests")
    p.key_flag("max_tokens", "judge.max_tokens", help="budget: stop cleanly after this many tokens")
    p.key_flag("max_output_tokens", "judge.max_output_tokens", help="cap on each verdict's length")
    p.key_flag("temperature", "judge.temperature", help="sampling temperature (null: not sent)")
    p.key_flag("both_orders", "judge.both_orders", boolean=True,
               help="judge each pair in both A/B orders; agreement -> that winner, disagreement -> tie")
    p.key_flag("serve_model", "judge.serve_model", help="model served locally when there is no key and no base URL")
    p.flag("retry_errors", action="store_true", default=True,
           help="re-judge pairs whose saved verdict has judge_error (the default; kept for old command lines)")
    p.flag("keep_errors", dest="retry_errors", action="store_false",
           help="keep saved verdicts with judge_error instead of re-judging them (the run stays incomplete, exit 75)")
    p.flag("no_structured", dest="structured", action="store_false",
           help="do not request JSON-schema output (parse free text only)")
    p.flag("backoff_base", type=float, default=1.0, metavar="S",
           help="first retry delay in seconds, doubled per retry, with jitter (default: 1.0)")
    p.flag("chosen_id", default=CHOSEN_ID, help=f"label of the HH chosen side in a_id/b_id (default: {CHOSEN_ID})")
    p.flag("no_progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _files(cfg, ns) -> tuple[list, Optional[list]]:
    from hhdpo.core.config import ConfigError

    if ns.in_file:
        if ns.models:
            raise ConfigError("give --in_file or --models, not both")
        return ns.in_file, ns.out_file
    if ns.out_file:
        raise ConfigError("--out_file needs --in_file (without it the files follow --models)")
    names = [n.strip() for n in (ns.models or ",".join(DEFAULT_MODELS)).split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--models {ns.models!r}: no model names")
    return model_files(cfg, names)


def _main(ns) -> int:
    from hhdpo.core.config import ConfigError
    from hhdpo.core.stage import load_stage_config

    cfg = load_stage_config(ns)
    if ns.backoff_base < 0:
        raise ConfigError(f"--backoff_base: got {ns.backoff_base}, expected a number >= 0")
    in_files, out_files = _files(cfg, ns)
    settings = JudgeSettings(cfg.judge, retry_errors=ns.retry_errors, structured=ns.structured,
                             backoff_base=ns.backoff_base, chosen_id=ns.chosen_id, progress=ns.progress)
    server_log = Path(out_files[0] if out_files else default_out_file(in_files[0])).with_name("judge_server.log")
    stats = judge_run(settings, in_files, out_files, server_log=server_log)

    def total(attr):
        return sum(getattr(st, attr) for st in stats.files)

    line = (f"judged {total('judged')}, errors {total('errors')}, skipped (already done) {total('skipped')} | "
            f"requests {stats.requests}, tokens {stats.input_tokens} in / {stats.output_tokens} out")
    if total("both_orders"):
        line += f" | order agreement {total('agree') / total('both_orders'):.1%} of {total('both_orders')}"
    print(line)
    if stats.budget_hit:
        unstarted = stats.unstarted
        print(f"budget hit: {stats.budget_hit}; stopped cleanly with {total('left')} pair(s) left"
              f"{f' and {unstarted} file(s) not started' if unstarted else ''}; rerun to continue")
    if not stats.complete:
        print(f"hhdpo judge: INCOMPLETE (exit {EXIT_INCOMPLETE}): {stats.incomplete_reason()}. Finished verdicts "
              "are kept; rerun to judge only the missing and errored pairs", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


def cli(argv: list[str] | None = None) -> int:
    from hhdpo.core.stage import run_stage

    ns = build_parser().parse(argv)
    return run_stage("hhdpo judge", lambda: _main(ns))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
