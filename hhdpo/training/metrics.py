"""Training metric names, their aggregation, and the sinks for rank 0: ``metrics.jsonl``
always, Weights & Biases when enabled.

Every record of ``metrics.jsonl`` is either a training record (keys :data:`TRAIN_KEYS`, every
``log_steps`` steps) or a validation record (keys :data:`EVAL_KEYS`). Rewards are the implicit
DPO rewards beta * (log pi - log pi_ref); accuracies the share of pairs whose chosen reward is
higher; ``logps/*`` the policy's (summed or length-averaged) response log-probs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from hhdpo.core.config import Config, redact
from hhdpo.core.io import append_jsonl, atomic_write_text, repair_jsonl

PAIR_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected")
"""Per-pair quantities, summed over pairs (and ranks, steps) and logged as means over pairs."""
TRAIN_KEYS = ("step", "epoch", *PAIR_SUMS, "rewards/margins", "grad_norm", "lr", "beta", "tokens/s")
EVAL_PREFIX = "eval/"
EVAL_KEYS = ("step", *(EVAL_PREFIX + k for k in (*PAIR_SUMS, "rewards/margins")), EVAL_PREFIX + "n")


def pair_sums(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """A micro-batch's :data:`PAIR_SUMS`, in that order, as one float64 tensor (to all-reduce)."""
    import torch

    return torch.stack([losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).float().sum(), policy_chosen_logps.detach().sum(),
                        policy_rejected_logps.detach().sum()]).double()


def pair_means(sums: Sequence[float], n: float, prefix: str = "") -> dict:
    """Means over ``n`` pairs of :data:`PAIR_SUMS`-ordered ``sums``, plus ``rewards/margins``."""
    rec = {prefix + k: s / n for k, s in zip(PAIR_SUMS, sums, strict=True)}
    rec[prefix + "rewards/margins"] = rec[prefix + "rewards/chosen"] - rec[prefix + "rewards/rejected"]
    return rec


def add_step(window: dict, stats: dict, seconds: float) -> None:
    """Add one optimizer step's summed stats (:data:`PAIR_SUMS`, n, tokens, grad_norm, lr) to
    ``window``, the sums since the last training record (kept in checkpoints as is)."""
    for k in (*PAIR_SUMS, "n", "tokens"):
        window[k] = window.get(k, 0.0) + stats[k]
    window["grad_norm_sum"] = window.get("grad_norm_sum", 0.0) + stats["grad_norm"]
    window["steps"] = window.get("steps", 0) + 1
    window["seconds"] = window.get("seconds", 0.0) + seconds
    window["lr"] = stats["lr"]


def train_record(window: dict, step: int, epoch: float, beta: float) -> dict:
    """The training record (keys :data:`TRAIN_KEYS`) of the steps summed in ``window``."""
    rec = {"step": step, "epoch": epoch, **pair_means([window[k] for k in PAIR_SUMS], window["n"]),
           "grad_norm": window["grad_norm_sum"] / window["steps"], "lr": window["lr"], "beta": beta,
           "tokens/s": window["tokens"] / max(window["seconds"], 1e-9)}
    return {k: rec[k] for k in TRAIN_KEYS}


def eval_record(sums: Sequence[float], n: float, step: int) -> dict:
    """The validation record (keys :data:`EVAL_KEYS`) of :data:`PAIR_SUMS`-ordered sums over ``n`` pairs."""
    rec = {"step": step, **pair_means(sums, n, EVAL_PREFIX), EVAL_PREFIX + "n": int(n)}
    return {k: rec[k] for k in EVAL_KEYS}


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
        if not self.enabled or not record:
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
