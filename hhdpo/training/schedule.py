"""A run's schedule from its numbers alone: pairs, ranks and the config -> steps, warmup,
validations and checkpoints, exactly as :mod:`hhdpo.training.trainer` will run them.

Pure arithmetic (no torch, no process group), so ``hhdpo plan`` can print it before anything is
submitted and the trainer prints the same line when it starts. The warnings name the schedules
that cannot do what the config asks: a warmup the run never leaves, a tail test that never
starts, validations or checkpoints that only ever happen at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from hhdpo.core.io import DataError
from hhdpo.data.hh import train_val_split


@dataclass(frozen=True)
class Schedule:
    pairs: int  # parsed pairs (the trainer) or the planned count (hhdpo plan)
    train_pairs: int
    val_pairs: int
    world: int  # ranks
    batch_size: int  # pairs per rank per micro-batch
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    tail_warmup: int | None  # None: the tail test is off
    eval_steps: int
    save_steps: int
    validations: int  # every eval_steps before the end, and the final one
    checkpoints: int  # every save_steps, and the final one unless it fell on a save step
    val_pairs_scored: int  # pairs one validation scores (whole batches on every rank)
    max_tokens: int = 0  # dpo_training.max_tokens_per_micro_batch: a rank's pairs of a step forwarded within this budget

    @property
    def global_batch(self) -> int:
        return self.world * self.batch_size * self.accumulation

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def schedule(pairs: int, world: int, cfg) -> Schedule:
    """The schedule of ``cfg`` (a :class:`hhdpo.core.config.Config`) on ``world`` ranks with ``pairs`` pairs."""
    t, ds = cfg.dpo_training, cfg.dataset
    train_idx, val_idx = train_val_split(pairs, ds.val_ratio, ds.seed)  # the trainer's own split
    n_train, n_val = len(train_idx), len(val_idx)
    # hhdpo.data.batching.rank_batches: (n // world) // batch_size micro-batches per rank, whole steps only
    steps_per_epoch = n_train // world // t.batch_size // t.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise DataError(f"{n_train} training pairs are too few for {world} ranks x batch_size "
                        f"{t.batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps}")
    total = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
    tail = cfg.tail_test
    tail_warmup = (tail.warmup_steps if tail.warmup_steps is not None else t.warmup_steps) if tail.enabled else None
    # validation runs whole batches on every rank: fewer pairs than one batch across ranks cannot make one
    val_scored = world * (n_val // world // t.batch_size * t.batch_size)
    # the trainer validates at every multiple of eval_steps below the last step, then once at the end
    validations = (((total - 1) // t.eval_steps if t.eval_steps else 0) + 1) if val_scored else 0
    save = cfg.checkpoint.save_steps
    checkpoints = (total // save if save else 0) + (0 if save and total % save == 0 else 1)
    return Schedule(pairs, n_train, n_val, world, t.batch_size, t.gradient_accumulation_steps, steps_per_epoch,
                    total, t.warmup_steps, tail_warmup, t.eval_steps, save, validations, checkpoints, val_scored,
                    t.max_tokens_per_micro_batch)


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _when(every: int, total: int) -> str:
    return f"every {every:,} + final" if every and every < total else "final only"


def schedule_line(s: Schedule) -> str:
    """The one line every training run prints at its start (and ``hhdpo plan`` prints too)."""
    val = _when(s.eval_steps, s.total_steps) if s.validations else "validation split smaller than one batch across ranks"
    return (f"schedule: {s.pairs:,} pairs ({s.train_pairs:,} train, {s.val_pairs:,} val), "
            f"global batch {s.global_batch:,} = {s.world} ranks x {s.batch_size} x {s.accumulation} accumulation, "
            + (f"micro-batches of <= {s.max_tokens:,} real tokens, " if s.max_tokens else "")
            + f"{s.steps_per_epoch:,} steps/epoch, {s.total_steps:,} total steps ({s.epochs:g} epoch{'' if s.epochs == 1 else 's'}), "
            f"warmup {s.warmup_steps:,} ({s.warmup_steps / s.total_steps:.1%}), "
            f"{_count(s.validations, 'validation')} ({val}), "
            f"{_count(s.checkpoints, 'checkpoint')} ({_when(s.save_steps, s.total_steps)})")


def schedule_warnings(s: Schedule) -> list[str]:
    """What in the schedule cannot work as the config asks; [] when nothing."""
    out = []
    if s.warmup_steps >= s.total_steps:
        out.append(f"dpo_training.warmup_steps={s.warmup_steps:,} reaches the run's {s.total_steps:,} steps: "
                   "the learning rate never leaves its warmup")
    if s.tail_warmup is not None and s.tail_warmup >= s.total_steps:
        out.append(f"the tail test's warm-up ({s.tail_warmup:,} steps: tail_test.warmup_steps, or "
                   f"dpo_training.warmup_steps when unset) reaches the run's {s.total_steps:,} steps: the tail test never starts")
    if s.eval_steps and s.val_pairs_scored and s.eval_steps >= s.total_steps:
        out.append(f"dpo_training.eval_steps={s.eval_steps:,} is not below the run's {s.total_steps:,} steps: "
                   "no validation before the final one")
    if s.save_steps and s.save_steps >= s.total_steps:
        out.append(f"checkpoint.save_steps={s.save_steps:,} is not below the run's {s.total_steps:,} steps: "
                   "no checkpoint before the final one")
    return out
