"""The DPO trainer (FSDP2): :class:`DPOTrainer` and :func:`run`; ``hhdpo train`` is :mod:`hhdpo.train`."""

from __future__ import annotations

import gc
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from hhdpo.core.config import Config, ConfigError, redact, run_paths
from hhdpo.core.distenv import STATE_REPORTED_BY_LAUNCHER, held_signal
from hhdpo.core.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED, BadInput, Preempted
from hhdpo.core.io import DataError, atomic_write_json
from hhdpo.core.models import cache_dir, load_tokenizer, resolve_model
from hhdpo.data.batching import rank_batches
from hhdpo.data.hh import load_pairs, train_val_split
from hhdpo.data.token_budget import pair_tokens, plan_forwards
from hhdpo.training import rank0
from hhdpo.training.checkpoint import kept_run_state
from hhdpo.training.forward import pair_batch, response_logps
from hhdpo.training.loss import implicit_margins, preference_loss
from hhdpo.training.metrics import (
    PAIR_SUMS,
    add_step,
    eval_record,
    pair_sums,
    train_record,
)
from hhdpo.training.optim import make_optimizer, optimizer_step, set_grad_sync
from hhdpo.training.packed_attention import default_padding_free, resolve_share_prompt
from hhdpo.training.ref_logps import cached_or_computed, compute_all, ref_cache_path
from hhdpo.training.runtime import build_model, resolve_runtime
from hhdpo.training.schedule import schedule, schedule_line, schedule_warnings
from hhdpo.training.tail import TailTest
from hhdpo.training.token_cache import tokenized_pairs
from hhdpo.training.train_state import TrainStateMixin


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    # torch 2.13 renamed all_gather_into_tensor (which now warns) to all_gather_single
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, inp)


class DPOTrainer(TrainStateMixin):
    """Full-parameter DPO with FSDP2 on one process, several ranks, or several nodes.

    Features:
      - FSDP2 ``fully_shard`` per decoder layer (found from ``_no_split_modules`` or
        ``dpo_training.fsdp_layer_cls``) then the root; gloo on CPU, nccl on GPU. With one
        process in fp32 there is nothing to shard: the model runs unwrapped, unless
        ``dpo_training.fsdp: true`` (the multi-GPU code path on one device). bf16 always runs
        through FSDP2's mixed precision, so the policy and the reference compute alike.
      - LM head (vocabulary projection) only at positions that predict a response token, in chunks
        recomputed in backward (``logits_chunk_tokens``; ``hhdpo.training.chunked_head``), and each
        micro-batch's chosen+rejected rows packed into one row without padding (``padding_free``;
        ``hhdpo.training.packed_attention``), each pair's prompt forwarded once (``share_prompt``),
        or forwarded in length-sorted groups, each padded only to its own longest row, split to
        minimise padded tokens plus a per-forward cost (``group_by_length``).
      - Frozen reference model sharded the same way, or reference log-probs precomputed
        once and cached on disk (``precompute_ref_log_probs``; keyed on the token ids, the
        reference weights, dtype and averaging; rank 0 decides a cache hit; ``hhdpo.training.ref_logps``).
      - Precision: fp32 on CPU; bf16 compute with fp32 master weights, gradients
        reduced in fp32 and fp32 (fused) AdamW state on GPU (``MixedPrecisionPolicy``).
      - Losses: sigmoid/cDPO, robust, hinge, IPO, reference-free (``hhdpo.training.loss``); summed or
        length-averaged log-probs (averaged by default for IPO).
      - Gradient accumulation (reduce-scattered every micro-batch; ``defer_grad_sync``: only the last), or a step's
        pairs forwarded by a token budget (``max_tokens_per_micro_batch``; ``hhdpo.data.token_budget``), clipping,
        linear warmup then constant/linear/cosine decay, activation checkpointing.
      - Tail test on all-gathered margins with optional adaptive beta (``hhdpo.training.tail``).
      - Metrics (names in ``hhdpo.training.metrics``) to ``metrics.jsonl``, W&B (rank 0) and a tqdm bar;
        validation every ``eval_steps`` and at the end (skipped, said once, when the
        validation split is smaller than one batch across ranks).
      - DCP sharded checkpoints every ``save_steps`` holding model, optimizer, scheduler,
        data position, RNG, tail-test state and beta (``hhdpo.training.checkpoint``); ``resume: auto``
        picks the newest complete one; resuming an older one explicitly sets the later ones
        aside as an abandoned branch, once: later attempts continue from the run's newest; an
        attempt killed before its first checkpoint starts over (its logs into logs/attempt-N/);
        SIGTERM/SIGUSR2 finish the step (or validation batch), save and exit 42, also when
        they come during start-up (``hhdpo.training.train_state``).
      - Rank-0-only work (run state, config, metrics and W&B, margins, the Hub download, the
        export) shares its outcome with every rank: one failure ends all (``hhdpo.training.rank0``).
      - Final Hugging Face directory (safetensors, config, tokenizer, chat template, the base
        model's generation config) gathered from the shards, loadable by ``from_pretrained``
        and vLLM; weight files of an earlier export are replaced, not left beside it.
      - Bad input found inside a worker (too few pairs, ...): run_state.json says
        ``bad_input`` and the process exits 2 without a traceback.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.dpo_training
        self.device, backend, self.dtype = resolve_runtime(cfg)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        rank0.setup()  # rank-0-only sections share their outcome over it (hhdpo.training.rank0)
        # bf16 goes through FSDP2's mixed precision even on one process: it casts the policy's fp32 master
        # weights to bf16 as the reference is stored, so both compute alike (under autocast the policy kept an
        # fp32 residual stream and its step-1 loss was not ln 2: 0.682 on an 8B-shaped model, H100)
        needs_fsdp = self.world > 1 or self.dtype != torch.float32
        self.sharded = needs_fsdp if t.fsdp is None else t.fsdp
        if needs_fsdp and not self.sharded:
            dtype = str(self.dtype).removeprefix("torch.")
            raise ConfigError(f"dpo_training.fsdp: false needs one process in float32; this run has {self.world} "
                              f"rank(s) in {dtype} (ranks train shards; bf16 is FSDP2's mixed precision)")
        self.paths = run_paths(cfg)
        self._seed_everything(t.seed)
        self._stop_signal = held_signal()  # one that came during start-up stops the run at the first step
        for s in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(s, self._on_signal)

        resume_from = self._choose_start()  # rank 0 decides for all (hhdpo.training.train_state)
        self._log(f"[train] attempt={os.environ.get('SLURM_RESTART_COUNT', '0')} world={self.world} device={self.device} "
                  f"backend={backend} dtype={self.dtype} fsdp={'yes' if self.sharded else 'no'} "
                  f"resume={'from ' + str(resume_from) if resume_from else 'no'}")

        self._fetch_hub_models()  # once per node, before anything loads them; the others wait for the outcome

        # data: every rank parses; each tokenizes its share once per run (hhdpo.training.token_cache); indices decide who trains on what
        self.tokenizer = load_tokenizer(cfg.policy_model, cfg.trust_remote_code)
        ds = cfg.dataset
        pairs, _ = load_pairs(ds.dataset_name, ds.subset, ds.data_dirs, log=self._log)
        self.examples = tokenized_pairs(pairs, self.tokenizer, ds, self.paths.save / "cache", self.device,
                                        log=self._log, progress=self.is_main)
        self.train_idx, self.val_idx = train_val_split(len(pairs), ds.val_ratio, ds.seed)
        per_rank = len(self.train_idx) // self.world // t.batch_size
        self.steps_per_epoch = per_rank // t.gradient_accumulation_steps
        if self.steps_per_epoch < 1:
            raise DataError(f"{len(self.train_idx)} training pairs are too few for {self.world} ranks x batch_size "
                            f"{t.batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps}")
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.steps_per_epoch
        # validation runs whole batches on every rank; fewer pairs than that cannot make one
        self.validates = len(self.val_idx) >= self.world * t.batch_size
        if not self.validates:
            self._log(f"[train] no validation: the validation split has {len(self.val_idx)} pair(s) (dataset.val_ratio="
                      f"{ds.val_ratio}), fewer than one batch across ranks ({self.world} x batch_size {t.batch_size})")
        plan = schedule(len(pairs), self.world, cfg)  # the arithmetic above in one line, as `hhdpo plan` prints it
        for line in [schedule_line(plan)] + [f"warning: {w}" for w in schedule_warnings(plan)]:
            self._log(f"[train] {line}")
        # under FSDP every extra forward gathers the parameters again (measured slower on 2 CPU ranks); on a
        # GPU many small forwards cost more than padding (4x fewer tokens/s on an 8B-shaped model, H100)
        self.group_by_length = (t.group_by_length if t.group_by_length is not None
                                else not self.sharded and self.device.type == "cpu")

        # models
        self.policy, self.hf_config, self.arch = self._build_model(cfg.policy_model, trainable=True)
        # one packed row per micro-batch, no padding (hhdpo.training.packed_attention: where it is on by default)
        self.padding_free = (t.padding_free if t.padding_free is not None
                             else bool(t.share_prompt) or default_padding_free(self.device, self.policy))
        self.share_prompt = resolve_share_prompt(t.share_prompt, self.padding_free, self.policy)  # each prompt once
        self._log(f"[train] batches: {'padding-free, each prompt once' if self.share_prompt else 'padding-free' if self.padding_free else 'padded'}"
                  f"{', length groups' if self.group_by_length and not self.padding_free else ''}")
        self.ref_logps = None
        self.ref = None
        if not t.reference_free:
            if t.precompute_ref_log_probs:
                self.ref_logps = self._precomputed_ref_logps()
            else:
                self.ref, _, _ = self._build_model(cfg.ref_model_path, trainable=False)
        self.opt, self.sched = make_optimizer(self.policy, t, self.total_steps)

        tail_warmup = cfg.tail_test.warmup_steps if cfg.tail_test.warmup_steps is not None else t.warmup_steps
        self.tail = TailTest(cfg.tail_test, tail_warmup, t.dpo_beta, self.paths.tail if self.is_main else None)
        self.beta = t.dpo_beta
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch already consumed
        self.window: dict[str, float] = {}
        self.last_saved_step = -1
        if resume_from is not None:
            self._resume(resume_from)
        self.logger = self._begin_attempt(resume_from)  # run state, config, margins logs, metrics.jsonl, W&B

    # ------------------------------------------------------------------ setup

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _build_model(self, spec: str, trainable: bool):
        return build_model(self.cfg, spec, trainable, self.device, self.dtype, self.world, self.sharded)

    # ------------------------------------------------------------------ forward

    def _batch(self, idxs: list[int]) -> dict:
        return pair_batch([self.examples[i] for i in idxs], self.tokenizer.pad_token_id, self.group_by_length, self.device,
                          self.padding_free, self.share_prompt)

    def _logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.dpo_training
        return response_logps(model, batch, t.average_log_prob, t.logits_chunk_tokens)

    def _ref(self, idxs: list[int], batch: dict):
        if self.cfg.dpo_training.reference_free:
            z = torch.zeros(len(idxs), device=self.device)
            return z, z
        if self.ref_logps is not None:
            t = torch.as_tensor(idxs)
            return self.ref_logps[0][t].to(self.device), self.ref_logps[1][t].to(self.device)
        with torch.no_grad():
            return self._logps(self.ref, batch)

    def _precomputed_ref_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of every pair, computed once and cached on disk (``hhdpo.training.ref_logps``)."""
        t = self.cfg.dpo_training
        ref_model = resolve_model(self.cfg.ref_model_path)

        def path():  # rank 0, before looking and before writing (a Hub model is pinned once downloaded)
            return ref_cache_path(cache_dir(), self.examples, ref_model, self.dtype, t.average_log_prob)

        def compute():
            ref, _, _ = self._build_model(self.cfg.ref_model_path, trainable=False)
            out = compute_all(len(self.examples), t.batch_size, lambda idxs: self._logps(ref, self._batch(idxs)),
                              self.device, progress=self.is_main)
            del ref
            gc.collect()  # FSDP wrappers hold reference cycles; free the model's memory now
            return out

        return cached_or_computed(path, len(self.examples), compute, self.device, self._log)

    # ------------------------------------------------------------------ training

    def _deal(self, idx, epoch: int) -> dict[int, list[list[int]]]:
        """Micro-batches (pair ids) of ``idx`` in ``epoch`` by rank: this rank's, and with a token budget every
        rank's (each rank plans all ranks' forwards alike, without communicating)."""
        t, n = self.cfg.dpo_training, len(idx)
        return {r: [[int(idx[i]) for i in b] for b in rank_batches(n, t.batch_size, r, self.world, epoch, self.cfg.dataset.seed)]
                for r in (range(self.world) if t.max_tokens_per_micro_batch else [self.rank])}

    def _plan(self, dealt: dict, start: int, count: int) -> list[list[int]] | None:
        """With a token budget, this rank's forwards (positions into its pairs of micro-batches
        [start, start+count)), as many as every other rank's (``hhdpo.data.token_budget``); else None."""
        budget = self.cfg.dpo_training.max_tokens_per_micro_batch
        if not budget:
            return None
        shares = [[i for b in dealt[r][start:start + count] for i in b] for r in range(self.world)]
        return plan_forwards([[pair_tokens(self.examples[i], self.share_prompt) for i in s] for s in shares], budget)[self.rank]

    def train_step(self, group: list[list[int]], forwards: list[list[int]] | None = None) -> tuple[dict, np.ndarray]:
        """One optimizer step over this rank's ``group`` micro-batches, forwarded as they are or as ``forwards``
        (positions into the group's pairs, :meth:`_plan`); returns summed stats and local margins in pair order."""
        t = self.cfg.dpo_training
        pairs = [i for b in group for i in b]
        forwards = forwards or np.split(np.arange(len(pairs)), len(group))  # as dealt: micro-batches of batch_size
        sums = torch.zeros(len(PAIR_SUMS) + 2, device=self.device, dtype=torch.float64)  # + pairs, tokens
        margins = []
        for i, fw in enumerate(forwards):
            idxs = [pairs[p] for p in fw]
            batch = self._batch(idxs)
            set_grad_sync(self.policy, i, len(forwards), t.defer_grad_sync)
            pc, pr = self._logps(self.policy, batch)
            rc, rr = self._ref(idxs, batch)
            losses, cr, rj = preference_loss(pc, pr, rc, rr, self.beta, t.loss_type, t.label_smoothing, t.reference_free)
            # every rank holds len(pairs) pairs and FSDP averages gradients over ranks: each pair weighs
            # 1 / (world x len(pairs)), the mean over the step's pairs however they are forwarded
            (losses.sum() / len(pairs)).backward()
            margins.append(implicit_margins(pc, pr, rc, rr).float())
            sums += torch.cat([pair_sums(losses, cr, rj, pc, pr),
                               torch.stack([torch.tensor(float(len(idxs)), device=self.device), batch["tokens"]]).double()])
        grad_norm, lr = optimizer_step(self.policy, self.opt, self.sched, t.max_grad_norm)
        dist.all_reduce(sums)
        local = torch.empty(len(pairs), device=self.device)
        local[torch.tensor([p for fw in forwards for p in fw], device=self.device)] = torch.cat(margins)  # pair order
        gathered = torch.zeros(self.world * local.numel(), device=self.device, dtype=local.dtype)
        _all_gather(gathered, local)
        *s, n, tokens = sums.tolist()
        stats = {**dict(zip(PAIR_SUMS, s)), "n": n, "tokens": tokens, "grad_norm": grad_norm, "lr": lr}
        return stats, gathered.cpu().numpy()

    def _epoch_progress(self) -> float:
        return self.epoch + self.batch_in_epoch / max(1, self.steps_per_epoch * self.cfg.dpo_training.gradient_accumulation_steps)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation record (keys ``hhdpo.training.metrics.EVAL_KEYS``); only when ``self.validates``."""
        t = self.cfg.dpo_training
        self.policy.eval()
        sums = torch.zeros(len(PAIR_SUMS) + 1, device=self.device, dtype=torch.float64)  # + pairs
        dealt = self._deal(self.val_idx, 0)
        # a token budget splits each batch further, as many forwards on every rank (validation sums: any split scores alike)
        forwards = [[b[p] for p in fw] for j, b in enumerate(dealt[self.rank]) for fw in self._plan(dealt, j, 1) or [range(len(b))]]
        for idxs in forwards:
            batch = self._batch(idxs)
            pc, pr = self._logps(self.policy, batch)
            rc, rr = self._ref(idxs, batch)
            losses, cr, rj = preference_loss(pc, pr, rc, rr, self.beta, t.loss_type, t.label_smoothing, t.reference_free)
            sums += torch.cat([pair_sums(losses, cr, rj, pc, pr), torch.tensor([float(len(idxs))], device=self.device).double()])
            self._check_preemption()  # a long validation must not outlast the signal lead; every rank has as many batches
        self.policy.train()
        dist.all_reduce(sums)
        *s, n = sums.tolist()
        return eval_record(s, n, self.step)

    def train(self) -> int:
        """Run to ``total_steps``; returns the process exit status (0 or EXIT_PREEMPTED)."""
        from tqdm.auto import tqdm

        t = self.cfg.dpo_training
        ga = t.gradient_accumulation_steps
        self._write_state("running")
        bar = tqdm(total=self.total_steps, initial=self.step, desc="dpo", disable=not self.is_main, dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                dealt = self._deal(self.train_idx, self.epoch)
                batches = dealt[self.rank]
                usable = len(batches) // ga * ga
                while self.batch_in_epoch < usable and self.step < self.total_steps:
                    group = batches[self.batch_in_epoch:self.batch_in_epoch + ga]
                    t0 = time.perf_counter()
                    stats, margins = self.train_step(group, self._plan(dealt, self.batch_in_epoch, ga))
                    self.step += 1
                    self.batch_in_epoch += ga
                    add_step(self.window, stats, time.perf_counter() - t0)
                    if self.cfg.tail_test.enabled:
                        self._update_tail(margins)  # rank 0 writes the margins logs; its outcome is shared
                    bar.update(1)
                    if self.step % t.log_steps == 0 or self.step == self.total_steps:
                        rec = train_record(self.window, self.step, self._epoch_progress(), self.beta)
                        self.window = {}
                        self._log_record(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['rewards/accuracies']:.2f}", tps=f"{rec['tokens/s']:.0f}")
                    if self.validates and t.eval_steps and self.step % t.eval_steps == 0 and self.step < self.total_steps:
                        self._log_record(self.evaluate())
                    if self.cfg.checkpoint.save_steps and self.step % self.cfg.checkpoint.save_steps == 0:
                        self.save_checkpoint()
                    self._check_preemption()
                if self.batch_in_epoch >= usable:
                    self.epoch += 1
                    self.batch_in_epoch = 0
            bar.close()
            if self.validates:
                ev = self.evaluate()
                self._log_record(ev)
                self._log("[eval] " + " ".join(f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float)))
            if self.last_saved_step != self.step:
                self.save_checkpoint()
            self.export_hf()
            self._write_state("completed")
            return 0
        except Preempted:
            bar.close()
            self._write_state("preempted")
            self._log(f"[train] preempted at step {self.step}: checkpoint saved, exiting {EXIT_PREEMPTED} for requeue")
            return EXIT_PREEMPTED
        finally:
            self.logger.close()


# ---------------------------------------------------------------------------- entry points


def run(cfg: Config) -> int:
    """Worker entry point (inside a process group).

    Bad input found only here (too few pairs for the batch, a chat template that cannot
    render a pair) exits 2 like the launcher's own checks: rank 0 records it in
    run_state.json (status ``bad_input``, which the launcher maps to exit 2) and says it once.
    """
    try:
        rc = DPOTrainer(cfg).train()
        # under hhdpo's own torchrun the launcher reports the recorded "preempted" state as 42
        return EXIT_OK if rc == EXIT_PREEMPTED and os.environ.get(STATE_REPORTED_BY_LAUNCHER) else rc
    except BadInput as e:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        if rank == 0:
            msg = redact(str(e))
            state = run_paths(cfg).state  # a later attempt of the run still knows its origin and W&B run
            atomic_write_json(state, {**kept_run_state(state), "status": "bad_input", "message": msg})
            print(f"hhdpo train: error: {msg}", file=sys.stderr, flush=True)
        # under hhdpo's own torchrun the launcher reports the recorded state as exit 2; a failed
        # worker would make torchrun print its ChildFailedError traceback over the message
        return EXIT_OK if os.environ.get(STATE_REPORTED_BY_LAUNCHER) else EXIT_BAD_INPUT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
