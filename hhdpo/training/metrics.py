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
    """Rank 0's sinks: ``metrics.jsonl`` and, unless ``wandb.mode: disabled``, a W&B run.

    The W&B run id is the run's own (``wandb_id``, kept in ``run_state.json``), so a requeued
    or rerun attempt continues the same W&B run (``resume="allow"``). When the attempt resumes
    from a checkpoint older than the last step already logged (a SIGKILL after the checkpoint,
    an explicitly named older checkpoint), W&B is *rewound* to the checkpoint's step
    (``resume_from="<id>?_step=<step>"``): the run then shows the resumed steps, not the
    abandoned ones (metrics.jsonl is truncated the same way). A W&B failure never stops
    training: an online init that fails (no network, no API key, a server refusing the rewind)
    warns and continues offline with the same id and rewind point (``wandb sync`` uploads it
    later); an offline one that fails warns and goes on with metrics.jsonl alone.
    """

    def __init__(self, path: Path, cfg: Config, enabled: bool, resume_step: int | None = None,
                 wandb_id: str | None = None):
        self.path = path
        self.enabled = enabled
        self.wandb = None
        self._wandb_warned = False
        if not enabled:
            return
        logged = last_step(path)
        if resume_step is not None:
            truncate_after_step(path, resume_step)
        if cfg.wandb.mode != "disabled":
            rewind = resume_step if resume_step is not None and logged is not None and logged > resume_step else None
            self.wandb = start_wandb(cfg, path.parent, wandb_id or _run_id(path.parent), rewind)

    def log(self, record: dict) -> None:
        if not self.enabled or not record:
            return
        append_jsonl(self.path, [record])
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))
            except Exception as e:  # noqa: BLE001 - W&B never stops training; metrics.jsonl has the record
                if not self._wandb_warned:
                    _warn(f"W&B could not log step {record.get('step')} ({type(e).__name__}: {e}); "
                          f"{self.path} keeps every record")
                    self._wandb_warned = True

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                _warn(f"W&B could not finish its run ({type(e).__name__}: {e})")
            self.wandb = None


def _warn(msg: str) -> None:
    import sys

    print(f"[wandb] warning: {redact(msg)}", file=sys.stderr, flush=True)


def start_wandb(cfg: Config, directory: Path, run_id: str, rewind_to: int | None):
    """The W&B run ``run_id`` (resumed if it exists), rewound to step ``rewind_to`` when given;
    falls back to offline when an online init fails, and to None (no W&B) when offline fails too."""
    import wandb

    # the config holds no secret by construction; redact() also scrubs env secrets
    safe = json.loads(redact(json.dumps(cfg.to_dict())))
    kw = dict(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.run_name,
              tags=cfg.wandb.tags or None, config=safe, dir=str(directory), id=run_id)
    # resume and resume_from exclude each other: the rewind resumes the same run id too
    kw.update({"resume_from": f"{run_id}?_step={rewind_to}"} if rewind_to is not None else {"resume": "allow"})
    mode = cfg.wandb.mode
    try:
        run = wandb.init(mode=mode, **kw)
    except Exception as e:  # noqa: BLE001 - W&B never stops training
        if mode != "online":
            _warn(f"W&B ({mode}) could not start ({type(e).__name__}: {e}); metrics go to metrics.jsonl only")
            return None
        _warn(f"W&B could not start online ({type(e).__name__}: {e}); continuing offline with run id {run_id} "
              f"(upload later: wandb sync {directory}/wandb/offline-run-*-{run_id})")
        try:
            wandb.teardown()  # the failed init's stream still holds the run id
            run = wandb.init(mode="offline", **kw)
        except Exception as e2:  # noqa: BLE001
            _warn(f"W&B could not start offline either ({type(e2).__name__}: {e2}); metrics go to metrics.jsonl only")
            return None
    if rewind_to is not None:
        print(f"[wandb] run {run_id} rewound to step {rewind_to}: the steps logged after it belonged to an "
              "abandoned attempt", flush=True)
    return run


def _run_id(save_dir: Path) -> str:
    """The W&B run id of a run from before ``run_state.json`` kept it (``.wandb_run_id``), else a new one."""
    f = save_dir / ".wandb_run_id"
    if f.is_file():
        return f.read_text().strip()
    return new_run_id()


def new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


def last_step(path: Path) -> int | None:
    """The highest step in ``metrics.jsonl`` (None: no record)."""
    if not path.is_file():
        return None
    return max((r.get("step", 0) for r in repair_jsonl(path)), default=None)


def truncate_after_step(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (a resumed run replays those steps)."""
    if not path.is_file():
        return
    records = repair_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
