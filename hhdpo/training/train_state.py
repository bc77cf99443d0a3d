"""DPOTrainer's run state: where an attempt starts, checkpoints, resume, preemption,
``run_state.json``, the metrics sinks and the final Hugging Face export (a mixin of
:class:`hhdpo.training.trainer.DPOTrainer`).

Every method here is collective. What only rank 0 does (deciding where the attempt starts,
setting an unfinished attempt's logs aside, run_state.json, config.yaml, metrics.jsonl and W&B,
the margins logs, the export) shares its outcome with every rank (:mod:`hhdpo.training.rank0`),
so a failure there ends every rank with rank 0's message instead of leaving them in a
collective until it times out. They use the trainer's ``cfg``, ``paths``, ``policy``, ``opt``,
``sched``, ``tail``, ``tokenizer``, ``hf_config``, ``arch``, ``dtype``, ``device``, ``world``,
``total_steps``, ``is_main``, ``_log``, ``_stop_signal`` and its position (``step``, ``epoch``,
``batch_in_epoch``, ``beta``, ``window``, ``last_saved_step``).

Attempts of one run (``run_state.json`` says which run a save_dir holds):

- with a checkpoint to resume (:func:`hhdpo.training.checkpoint.find_resume_checkpoint`):
  continue from it; ``checkpoint.resume: <path>`` starts the run and every later attempt
  continues from the run's newest checkpoint;
- without one, in a save_dir whose run never completed (killed before its first checkpoint):
  start over, its metrics, margins and run state moved into ``logs/attempt-<N>/``;
- without one, in a save_dir of a completed run (or one without a run state): refused, exit 2.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hhdpo.core.config import save_config
from hhdpo.core.errors import Preempted
from hhdpo.core.io import atomic_write_json
from hhdpo.core.models import download_hub_model, resolve_model
from hhdpo.data.batching import resume_batch_index
from hhdpo.training import checkpoint as ckpt
from hhdpo.training import rank0
from hhdpo.training.metrics import MetricsLogger, new_run_id, truncate_after_step

class TrainStateMixin:
    """Attempts, checkpoints, resume, preemption, metrics sinks and export for the DPO trainer."""

    _run_record: dict | None = None  # run_state.json's kept fields (rank 0)
    _start_over = False

    # ------------------------------------------------------------------ the start of an attempt

    def _choose_start(self) -> Path | None:
        """The checkpoint this attempt resumes (None: from the base model), decided by rank 0 for all."""
        def decide():
            path = ckpt.find_resume_checkpoint(self.cfg)
            return (str(path), False) if path is not None else (None, ckpt.starts_over(self.cfg))

        path, self._start_over = rank0.on_rank0("choosing the checkpoint to resume", decide)
        return None if path is None else Path(path)

    def _fetch_hub_models(self) -> None:
        """Download the Hub models (policy, reference) once per node before anything loads them, while
        the other ranks wait for the outcome (up to ``rank0.WAIT_S``, not a collective's timeout)."""
        specs = [self.cfg.policy_model] + ([] if self.cfg.dpo_training.reference_free else [self.cfg.ref_model_path])
        hub = sorted({r for r in map(resolve_model, specs) if not Path(r).is_dir()})
        if hub:  # the same on every rank
            rank0.on_node_leaders(f"downloading {', '.join(hub)} from the Hugging Face Hub",
                                  lambda: [download_hub_model(h) for h in hub])

    def _begin_attempt(self, resume_from: Path | None) -> MetricsLogger:
        """Rank 0 records the attempt (setting an unfinished attempt's logs aside when it starts
        over), saves the config and trims the margins logs to the resumed step; then the metrics
        sinks open (W&B on rank 0). Returns the metrics logger."""
        cfg = self.cfg

        def begin():
            if self._start_over:
                aside = ckpt.set_aside_attempt(cfg)
                self._log(f"[train] {self.paths.save} held an attempt of this run that never completed and left no "
                          f"checkpoint: starting over; its logs are in {aside}")
            kept = ckpt.kept_run_state(self.paths.state)
            named = cfg.checkpoint.resume not in ("auto", "never")
            if resume_from is not None and named and resume_from.resolve() == Path(cfg.checkpoint.resume).expanduser().resolve():
                # the named checkpoint starts this run; later attempts continue from the run's newest
                kept["resumed_from"] = {"path": str(resume_from.resolve()), "step": self.step}
            if cfg.wandb.mode != "disabled":
                legacy = self.paths.save / ".wandb_run_id"
                kept.setdefault("wandb_run_id", legacy.read_text().strip() if legacy.is_file() else new_run_id())
            self._run_record = kept
            self._write_state_file("running")
            save_config(cfg, self.paths.save, previous_tag=f"before_step_{self.step:07d}", log=self._log)
            for name in ("global_margins_log.jsonl", "global_tail_test_and_beta_log.jsonl"):
                truncate_after_step(self.paths.tail / name, self.step)

        rank0.on_rank0(f"starting the run's files in {self.paths.save} (run state, config, margins logs)", begin)
        with rank0.shared("opening metrics.jsonl and W&B"):
            logger = MetricsLogger(self.paths.metrics, cfg, self.is_main, resume_step=self.step,
                                   wandb_id=(self._run_record or {}).get("wandb_run_id"))
        return logger

    # ------------------------------------------------------------------ preemption, run state, logs

    def _check_preemption(self) -> None:
        flag = torch.tensor([self._stop_signal], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # ranks may see the signal at different steps
        if flag.item():
            if self.last_saved_step != self.step:
                self.save_checkpoint()
            raise Preempted()

    def _write_state_file(self, status: str) -> None:
        atomic_write_json(self.paths.state, {"status": status, "step": self.step, "total_steps": self.total_steps,
                                             **(self._run_record or {})})

    def _write_state(self, status: str) -> None:
        rank0.on_rank0(f"writing {self.paths.state}", lambda: self._write_state_file(status))

    def _update_tail(self, margins) -> None:
        """The tail test's step on every rank (rank 0 writes the margins logs), then the new beta."""
        with rank0.shared(f"writing the margins logs of step {self.step} in {self.paths.tail}"):
            self.tail.update(margins, self.step, self.epoch)
        self.beta = self.tail.beta

    def _log_record(self, record: dict) -> None:
        """A metrics record to metrics.jsonl and W&B (rank 0)."""
        with rank0.shared(f"writing step {record.get('step')} to {self.paths.metrics}"):
            self.logger.log(record)

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

        def set_aside():
            moved_to, later = ckpt.set_aside_later_checkpoints(self.paths.ckpt, path)
            if later:
                self._log(f"[ckpt] resumed from an older checkpoint: the later {', '.join(p.name for p in later)} "
                          f"belong to an abandoned branch, moved to {moved_to}")

        rank0.on_rank0(f"setting aside the checkpoints after {path}", set_aside)

    def export_hf(self) -> Path:
        """The final Hugging Face directory in save_dir (``hhdpo.training.checkpoint.export_hf``); collective."""
        save = self.paths.save
        ckpt.export_hf(self.policy, self.hf_config, self.arch, self.tokenizer, self.dtype, save,
                       resolve_model(self.cfg.policy_model))
        self._log(f"[train] saved Hugging Face model to {save}")
        return save
