"""DPOTrainer's run state: checkpoints, resume, preemption, ``run_state.json`` and the final
Hugging Face export (a mixin of :class:`hhdpo.train.DPOTrainer`).

Every method here is collective except ``_write_state`` (rank 0 writes). They use the
trainer's ``cfg``, ``paths``, ``policy``, ``opt``, ``sched``, ``tail``, ``tokenizer``,
``hf_config``, ``arch``, ``dtype``, ``device``, ``world``, ``is_main``, ``_log``,
``_stop_signal`` and its position (``step``, ``epoch``, ``batch_in_epoch``, ``beta``,
``window``, ``last_saved_step``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hhdpo.core.errors import Preempted
from hhdpo.core.io import atomic_write_json
from hhdpo.core.models import resolve_model
from hhdpo.data.batching import resume_batch_index
from hhdpo.training import checkpoint as ckpt


class TrainStateMixin:
    """Checkpoint, resume, preemption and export for :class:`hhdpo.train.DPOTrainer`."""

    # ------------------------------------------------------------------ preemption, run state

    def _check_preemption(self) -> None:
        flag = torch.tensor([self._stop_signal], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # ranks may see the signal at different steps
        if flag.item():
            if self.last_saved_step != self.step:
                self.save_checkpoint()
            raise Preempted()

    def _write_state(self, status: str) -> None:
        if self.is_main:
            atomic_write_json(self.paths.state, {"status": status, "step": self.step, "total_steps": self.total_steps})

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Checkpoint this step (``hhdpo.training.checkpoint``); collective."""
        # the data position as pairs used (not this run's micro-batch count): valid for any world/batch size
        state = {"step": self.step, "epoch": self.epoch, "beta": self.beta,
                 "pairs_in_epoch": self.batch_in_epoch * self.cfg.dpo_training.batch_size * self.world,
                 "tail": self.tail.state_dict(), "scheduler": self.sched.state_dict(), "window": self.window,
                 "world": self.world}
        path = ckpt.save_checkpoint(self.paths.ckpt, self.step, self.policy, self.opt, state, self.cfg.checkpoint.keep_last)
        self.last_saved_step = self.step
        self._log(f"[ckpt] saved {path}")
        return path

    def _resume(self, path: Path) -> None:
        tr = ckpt.load_checkpoint(path, self.policy, self.opt)
        self.sched.load_state_dict(tr["scheduler"])
        self.step, self.epoch = tr["step"], tr["epoch"]
        self.batch_in_epoch, repeated = resume_batch_index(tr["pairs_in_epoch"], self.cfg.dpo_training.batch_size, self.world)
        if repeated:
            self._log(f"[ckpt] warning: {tr['pairs_in_epoch']} pairs of epoch {self.epoch} were used, not a whole number "
                      f"of this run's micro-batches; {repeated} of them are seen again")
        self.beta, self.window = tr["beta"], tr["window"]
        self.tail.load_state_dict(tr["tail"])
        self.last_saved_step = self.step
        self._log(f"[ckpt] resumed from {path} at step {self.step} (epoch {self.epoch}, micro-batch {self.batch_in_epoch})")
        if self.is_main:
            moved_to, later = ckpt.set_aside_later_checkpoints(self.paths.ckpt, path)
            if later:
                self._log(f"[ckpt] resumed from an older checkpoint: the later {', '.join(p.name for p in later)} "
                          f"belong to an abandoned branch, moved to {moved_to}")

    def export_hf(self) -> Path:
        """The final Hugging Face directory in save_dir (``hhdpo.training.checkpoint.export_hf``); collective."""
        save = self.paths.save
        ckpt.export_hf(self.policy, self.hf_config, self.arch, self.tokenizer, self.dtype, save,
                       resolve_model(self.cfg.policy_model))
        self._log(f"[train] saved Hugging Face model to {save}")
        return save
