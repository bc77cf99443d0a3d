"""Metric sinks for rank 0: ``metrics.jsonl`` always, Weights & Biases when enabled."""

from __future__ import annotations

import json
from pathlib import Path

from hhdpo.config import Config, redact
from hhdpo.io import append_jsonl, atomic_write_text, repair_jsonl


class MetricsLogger:
    def __init__(self, path: Path, cfg: Config, enabled: bool, resume_step: int | None = None):
        self.path = path
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_after_step(path, resume_step)
        if cfg.wandb.mode != "disabled":
            import wandb

            # the config holds no secret by construction; redact() also scrubs env secrets
            safe = json.loads(redact(json.dumps(cfg.to_dict())))
            self.wandb = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.run_name,
                tags=cfg.wandb.tags or None, mode=cfg.wandb.mode, config=safe,
                dir=str(path.parent), resume="allow", id=_run_id(path.parent),
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, [record])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(save_dir: Path) -> str:
    """A stable W&B run id per save_dir, so a requeued job continues the same run."""
    f = save_dir / ".wandb_run_id"
    if f.is_file():
        return f.read_text().strip()
    import secrets

    rid = secrets.token_hex(4)
    atomic_write_text(f, rid)
    return rid


def truncate_after_step(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (a resumed run replays those steps)."""
    if not path.is_file():
        return
    records = repair_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
