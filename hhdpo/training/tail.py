"""Tail test on DPO margins, and the optional adaptive beta.

The seed's research instrument: watch the upper tail of the global margin distribution
M = (log pi(c) - log pi(r)) - (log pi_ref(c) - log pi_ref(r)).

- Warmup (first ``warmup_steps`` optimizer steps): pool every step's global margins once;
  at the end tau_0 = quantile(pooled, 1 - delta). With ``warmup_steps`` 0 there is no pool:
  tau starts at the first step's own batch quantile (the EMA of that one batch) and the
  test runs from step 1.
- After warmup, each step: tau <- (1 - lambda) tau + lambda quantile(M_batch, 1 - delta);
  p_hat = mean(M_batch > tau); risk_over = p_hat > delta.
- Adaptive beta (optional): u = (p_hat - delta) / sqrt(delta (1 - delta) / n),
  s = tanh(gamma u), beta <- clip(beta exp(alpha s), beta_min, beta_max).

Logs, in the seed's formats, under ``tail_test.log_dir``: ``global_margins_log.jsonl`` (+
``epoch_XXX/step_XXXXX.npy``) and ``global_tail_test_and_beta_log.jsonl``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hhdpo.core.io import append_jsonl


def ema_threshold(tau: float, margins: np.ndarray, q: float, lam: float) -> float:
    return (1.0 - lam) * tau + lam * float(np.quantile(margins, q))


def exceedance(margins: np.ndarray, tau: float) -> float:
    return float(np.mean(margins > tau))


def adapt_beta(beta: float, p_hat: float, delta: float, n: int, alpha: float, gamma: float, beta_min: float, beta_max: float) -> float:
    """One multiplicative beta update from the tail exceedance z-score (see module doc)."""
    u = (p_hat - delta) / math.sqrt(delta * (1.0 - delta) / n)
    return float(min(max(beta * math.exp(alpha * math.tanh(gamma * u)), beta_min), beta_max))


def margin_stats(m: np.ndarray) -> dict:
    p10, med, p90 = np.quantile(m, [0.1, 0.5, 0.9])
    return {
        "batch_size": int(m.size), "mean": float(m.mean()), "std": float(m.std()), "min": float(m.min()),
        "p10": float(p10), "median": float(med), "p90": float(p90), "max": float(m.max()),
        "pos_frac": float(np.mean(m > 0)),
    }


class TailTest:
    """Stateful tail test; all ranks hold identical state (its input is all-gathered)."""

    def __init__(self, cfg_tail, warmup_steps: int, beta: float, log_dir: str | Path | None):
        self.cfg = cfg_tail
        self.warmup_steps = warmup_steps
        self.q = 1.0 - cfg_tail.delta
        self.beta = beta
        self.tau: float | None = None
        self.pool: list[np.ndarray] = []
        self.log_dir = Path(log_dir) if log_dir is not None else None

    def state_dict(self) -> dict:
        pool = np.concatenate(self.pool).tolist() if self.pool else []
        return {"tau": self.tau, "beta": self.beta, "pool": pool}

    def load_state_dict(self, sd: dict) -> None:
        self.tau, self.beta = sd["tau"], sd["beta"]
        self.pool = [np.asarray(sd["pool"], dtype=np.float64)] if sd["pool"] else []

    def update(self, margins: np.ndarray, step: int, epoch: int) -> dict:
        """Consume one optimizer step's global margins; returns what was logged."""
        margins = np.asarray(margins, dtype=np.float64)
        c = self.cfg
        self._log_margins(margins, step, epoch)
        out: dict = {}
        if step <= self.warmup_steps:
            self.pool.append(margins)
            if step == self.warmup_steps:
                self.tau = float(np.quantile(np.concatenate(self.pool), self.q))
                self.pool = []
                out = {"type": "warmup_end", "step": step, "tau_0": self.tau, "beta": self.beta}
        else:
            start = self.tau if self.tau is not None else float(np.quantile(margins, self.q))  # no warmup
            self.tau = ema_threshold(start, margins, self.q, c.lambda_)
            p_hat = exceedance(margins, self.tau)
            if c.adaptive_beta:
                self.beta = adapt_beta(self.beta, p_hat, c.delta, margins.size, c.alpha, c.gamma, c.beta_min, c.beta_max)
            out = {"step": step, "tau": self.tau, "p_hat": p_hat, "risk_over": bool(p_hat > c.delta), "beta": self.beta}
        if out and self.log_dir is not None:
            append_jsonl(self.log_dir / "global_tail_test_and_beta_log.jsonl", [out])
        return out

    def _log_margins(self, m: np.ndarray, step: int, epoch: int) -> None:
        if self.log_dir is None:
            return
        rec = {"epoch": epoch, "step": step, **margin_stats(m)}
        npy = None
        if self.cfg.save_npy:
            rel = Path(f"epoch_{epoch:03d}") / f"step_{step:05d}.npy"
            (self.log_dir / rel.parent).mkdir(parents=True, exist_ok=True)
            np.save(self.log_dir / rel, m.astype(np.float32))
            npy = str(rel)
        rec["npy"] = npy
        rec["sample"] = [round(float(v), 4) for v in m[:8]]
        append_jsonl(self.log_dir / "global_margins_log.jsonl", [rec])
