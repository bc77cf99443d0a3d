"""``hhdpo upload``: push the trained model and the run's logs to the Hugging Face Hub.

Two repositories (names from ``huggingface.model_repo`` / ``huggingface.logs_repo`` or flags):

* the **model** repo (type model): the top-level files of the trained model directory
  (weights, config, tokenizer, the run's ``config.yaml``) plus a generated ``README.md``
  model card with the training config (secrets redacted), the last metrics line and
  the win rates (from the summary JSON when there is one);
* the **logs** repo (type dataset: logs are data, not a loadable model): the margins
  directory, ``metrics.jsonl``, the eval outputs directory and the summary.

Each repo gets one commit (all files or none). ``--dry-run`` prints what would be
uploaded (files and sizes) and needs no token. The token comes from ``HF_TOKEN`` (or a
saved ``hf auth login``); ``HF_ENDPOINT`` is honoured.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from hhdpo.core.config import Config, redact, run_paths
from hhdpo.core.errors import BadInput

# run state that lives in save_dir but is not part of the model
_NOT_MODEL_FILES = {"metrics.jsonl", "run_state.json", "README.md"}


class UploadError(BadInput):
    """Nothing was uploaded (bad input: no token, no repo, not a model directory); the message says why."""


@dataclass
class Item:
    path_in_repo: str
    source: Union[Path, bytes]  # a file, or generated content
    note: str = ""

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


@dataclass
class Target:
    kind: str  # model | logs
    repo_id: str
    repo_type: str
    items: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(i.size for i in self.items)


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _visible(p: Path, root: Path) -> bool:
    """A regular file that is not hidden, under no hidden dir, and not a temp file of an atomic write."""
    rel = p.relative_to(root)
    return p.is_file() and not any(part.startswith(".") for part in rel.parts) and p.suffix not in (".tmp", ".partial")


def _files_under(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if _visible(p, root)]


def last_jsonl_record(path: Optional[Path]) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run: the previous one stands
            if isinstance(rec, dict):
                last = rec
    return last


def read_config_text(model_dir: Path) -> Optional[str]:
    p = model_dir / "config.yaml"
    return redact(p.read_text(encoding="utf-8")) if p.is_file() else None


def model_card(repo_id: str, config_text: Optional[str], metrics: Optional[dict], summary: Optional[dict],
               logs_repo: Optional[str] = None) -> str:
    """The model repo's README.md (pure: everything passed in; config_text already redacted)."""
    base = None
    if config_text:
        import yaml

        try:
            cfg = yaml.safe_load(config_text) or {}
            pm = cfg.get("policy_model") if isinstance(cfg, dict) else None
            if isinstance(pm, str) and pm.count("/") == 1 and not pm.startswith((".", "/", "~")):
                base = pm  # a Hub id: link the card to its base model
        except yaml.YAMLError:
            pass
    meta = ["---", "library_name: transformers", "tags:", "- dpo", "- hh-rlhf", "- hhdpo",
            "datasets:", "- Anthropic/hh-rlhf"] + ([f"base_model: {base}"] if base else []) + ["---", ""]
    lines = meta + [f"# {repo_id.split('/')[-1]}", "",
                    "A policy trained with Direct Preference Optimization (DPO) on Anthropic HH-RLHF "
                    "using `hhdpo`" + (f", from `{base}`." if base else "."), ""]
    if summary and summary.get("files"):
        from hhdpo.evaluation.summarize import markdown

        judges = sorted({j for r in summary["files"] for j in r.get("judge_models", [])})
        lines += ["## Win rates against the HH chosen responses", "",
                  f"Judged pairwise by {', '.join(judges) or 'an LLM judge'}; errored verdicts are excluded.", "",
                  markdown(summary), ""]
    if metrics:
        lines += ["## Final training metrics", "", "| metric | value |", "|---|---:|"]
        for k, v in metrics.items():
            if isinstance(v, float):
                v = f"{v:.6g}"
            lines.append(f"| {k} | {v} |")
        lines.append("")
    if config_text:
        lines += ["## Training configuration", "", "```yaml", config_text.rstrip(), "```", ""]
    if logs_repo:
        lines += ["## Logs", "", f"Margins, metrics and evaluation outputs: "
                  f"[{logs_repo}](https://huggingface.co/datasets/{logs_repo}).", ""]
    return "\n".join(lines)


def logs_card(logs_repo: str, model_repo: Optional[str], summary: Optional[dict]) -> str:
    lines = [f"# {logs_repo.split('/')[-1]}", "", "Training and evaluation logs of an `hhdpo` DPO run"
             + (f" (model: [{model_repo}](https://huggingface.co/{model_repo}))." if model_repo else "."), "",
             "- `margins/`: per-step DPO margin / tail-test logs",
             "- `metrics.jsonl`: training metrics, one line per log step",
             "- `eval/`: generations, pairwise files, judged verdicts, `summary.json` (win rates, Wilson CIs)", ""]
    if summary and summary.get("files"):
        from hhdpo.evaluation.summarize import markdown

        lines += [markdown(summary), ""]
    return "\n".join(lines)


@dataclass
class Sources:
    model_dir: Path
    margins_dir: Optional[Path] = None
    metrics: Optional[Path] = None
    eval_dir: Optional[Path] = None
    summary: Optional[Path] = None


def load_summary(path: Optional[Path]) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UploadError(f"{path}: not valid JSON ({e.msg}); pass --summary or fix it") from None


def plan(src: Sources, model_repo: Optional[str], logs_repo: Optional[str], what: str = "all") -> list[Target]:
    """Work out both repos' contents; raises UploadError when there is nothing sensible to do."""
    targets = []
    summary = load_summary(src.summary)
    config_text = read_config_text(src.model_dir) if src.model_dir.is_dir() else None
    if what in ("all", "model"):
        if not model_repo:
            raise UploadError("no model repo: set huggingface.model_repo in the config or pass --model_repo")
        if not (src.model_dir / "config.json").is_file():
            raise UploadError(f"{src.model_dir}: no config.json, not a trained model directory (see --model_dir)")
        t = Target("model", model_repo, "model")
        t.items.append(Item("README.md", model_card(model_repo, config_text, last_jsonl_record(src.metrics),
                                                    summary, logs_repo).encode(), "generated model card"))
        for p in sorted(src.model_dir.iterdir()):  # top level only: subdirs are checkpoints and logs
            if not _visible(p, src.model_dir) or p.name in _NOT_MODEL_FILES:
                continue
            if p.name == "config.yaml":
                t.items.append(Item("config.yaml", config_text.encode(), "training config, secrets redacted"))
            else:
                t.items.append(Item(p.name, p))
        targets.append(t)
    if what in ("all", "logs"):
        if not logs_repo:
            raise UploadError("no logs repo: set huggingface.logs_repo in the config or pass --logs_repo")
        t = Target("logs", logs_repo, "dataset")
        t.items.append(Item("README.md", logs_card(logs_repo, model_repo, summary).encode(), "generated card"))
        if config_text:
            t.items.append(Item("config.yaml", config_text.encode(), "training config, secrets redacted"))
        if src.margins_dir and src.margins_dir.is_dir():
            t.items += [Item(f"margins/{p.relative_to(src.margins_dir).as_posix()}", p)
                        for p in _files_under(src.margins_dir)]
        if src.metrics and src.metrics.is_file():
            t.items.append(Item("metrics.jsonl", src.metrics))
        if src.eval_dir and src.eval_dir.is_dir():
            t.items += [Item(f"eval/{p.relative_to(src.eval_dir).as_posix()}", p) for p in _files_under(src.eval_dir)]
        in_eval = bool(src.eval_dir and src.summary and src.summary.resolve().is_relative_to(src.eval_dir.resolve()))
        if src.summary and src.summary.is_file() and not in_eval:  # else already under eval/
            t.items.append(Item("summary.json", src.summary))
        if len(t.items) <= 2:
            raise UploadError("no logs found (margins dir, metrics.jsonl, eval dir, summary); "
                              "check --margins_dir/--metrics/--eval_dir or use --only model")
        targets.append(t)
    return targets


def describe(targets: list[Target], private: bool) -> str:
    lines = []
    for t in targets:
        lines.append(f"{t.kind} -> {t.repo_id} ({t.repo_type}, {'private' if private else 'public'}): "
                     f"{len(t.items)} files, {human_size(t.size)}")
        width = max(len(i.path_in_repo) for i in t.items)
        for i in t.items:
            note = f"  ({i.note})" if i.note else ""
            lines.append(f"  {i.path_in_repo:<{width}}  {human_size(i.size):>9}{note}")
    return "\n".join(lines)


def get_token() -> str:
    import huggingface_hub

    token = os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise UploadError("HF_TOKEN is not set: export HF_TOKEN=<a write token> (or run `hf auth login`); "
                          "--dry-run shows what would be uploaded without one")
    return token


def upload(targets: list[Target], private: bool, token: str, api=None,
           commit_message: str = "Upload from hhdpo") -> list[str]:
    """Create the repos if needed and push each as one commit; returns the commit URLs."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    urls = []
    for t in targets:
        api.create_repo(t.repo_id, repo_type=t.repo_type, private=private, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=i.path_in_repo,
                                  path_or_fileobj=i.source if isinstance(i.source, bytes) else str(i.source))
               for i in t.items]
        info = api.create_commit(t.repo_id, operations=ops, commit_message=commit_message, repo_type=t.repo_type)
        urls.append(str(getattr(info, "commit_url", info)))
    return urls


def _resolve_sources(args, cfg: Config) -> Sources:
    paths = run_paths(cfg)
    model_dir = Path(args.model_dir) if args.model_dir else paths.save
    margins = Path(args.margins_dir) if args.margins_dir else paths.tail
    eval_dir = Path(args.eval_dir) if args.eval_dir else paths.eval
    summary = Path(args.summary) if args.summary else eval_dir / "summary.json"
    metrics = Path(args.metrics) if args.metrics else model_dir / "metrics.jsonl"
    return Sources(model_dir, margins, metrics, eval_dir, summary)


def cli(argv: list[str]) -> int:
    from hhdpo.core.stage import StageParser, load_stage_config, run_stage

    p = StageParser(
        "hhdpo upload", "Upload the trained model (with a generated model card) and the run's logs to the "
        "Hugging Face Hub. Needs HF_TOKEN unless --dry-run.", config_required=False,
        config_help="YAML config (default: <model_dir>/config.yaml saved by training, if any)")
    p.flag("model_dir", help="trained model directory (default: dpo_training.save_dir)")
    p.key_flag("model_repo", "huggingface.model_repo", help="model repo id, e.g. me/dpo-smollm2")
    p.key_flag("logs_repo", "huggingface.logs_repo", help="logs repo id, a dataset repo")
    p.flag("margins_dir", help="margins log dir (default: tail_test.log_dir, under the model dir)")
    p.flag("metrics", help="metrics JSONL (default: <model_dir>/metrics.jsonl)")
    p.flag("eval_dir", help="eval outputs dir (default: eval.out_dir)")
    p.flag("summary", help="summary JSON from `hhdpo summarize` (default: <eval_dir>/summary.json)")
    p.key_flag("private", "huggingface.private", boolean=True, help="create the repos private")
    p.flag("only", choices=("model", "logs"), default=None, help="upload only one of the two repos")
    p.flag("commit_message", default="Upload from hhdpo", help="commit message")
    p.flag("dry_run", action="store_true", help="list what would be uploaded (files, sizes) and exit; needs no token")
    args = p.parse(argv)
    if args.config is None and args.model_dir and (Path(args.model_dir) / "config.yaml").is_file():
        args.config = str(Path(args.model_dir) / "config.yaml")

    def body() -> int:
        cfg = load_stage_config(args)
        hf = cfg.huggingface
        targets = plan(_resolve_sources(args, cfg), hf.model_repo, hf.logs_repo, args.only or "all")
        print(describe(targets, hf.private))
        if args.dry_run:
            print("dry run: nothing uploaded")
            return 0
        try:
            urls = upload(targets, hf.private, get_token(), commit_message=args.commit_message)
        except BadInput:
            raise
        except Exception as e:  # Hub/HTTP errors: one readable line, never a token
            print(f"hhdpo upload: upload failed: {type(e).__name__}: {redact(str(e))}", file=sys.stderr)
            return 1
        for url in urls:
            print(f"uploaded: {url}")
        return 0

    return run_stage("hhdpo upload", body)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
