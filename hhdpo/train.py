"""DPO training on Anthropic HH-RLHF with FSDP2.

    # one node: hhdpo becomes torchrun itself (CPU -> gloo, GPU -> nccl, chosen at run time)
    hhdpo train --config configs/smollm2_cpu.yaml
    hhdpo train --config configs/smollm2_cpu.yaml --nproc-per-node 2 dpo_training.max_steps=40
    # under an existing launcher, the process group is joined as is
    torchrun --nproc-per-node 8 -m hhdpo.train --config configs/llama31_8b.yaml
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 -m hhdpo.train --config ...
    srun --ntasks-per-node 8 python -m hhdpo.train --config configs/llama31_8b.yaml   # one task per GPU

Exit status: 0 done, 2 bad config/input, 42 preempted (checkpoint saved; requeue me).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hhdpo.config import Config, ConfigError, config_reference, load_config, run_paths, save_config
from hhdpo.data import collate_groups, load_pairs, rank_batches, resume_batch_index, tokenize_pairs, train_val_split
from hhdpo.io import DataError, atomic_write_json
from hhdpo.launch import EXIT_PREEMPTED, adopt_slurm_env, in_distributed_env, run_under_torchrun
from hhdpo.loss import implicit_margins, packed_sequence_logps, preference_loss, scored_positions, token_logps
from hhdpo.metrics import MetricsLogger, truncate_after_step
from hhdpo.models import (ModelError, cache_dir, decoder_layer_classes, lm_head_only_at, load_model, load_tokenizer,
                          resolve_model)
from hhdpo.stage import StageParser, load_stage_config, run_stage
from hhdpo.tail import TailTest

CKPT_PREFIX = "step_"


class Preempted(Exception):
    pass


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    # torch 2.13 renamed all_gather_into_tensor (which now warns) to all_gather_single
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, inp)


def resolve_runtime(cfg: Config) -> tuple[torch.device, str, torch.dtype]:
    """Device, process-group backend and compute dtype, decided at run time."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if use_cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return device, ("nccl" if use_cuda else "gloo"), dtype


def lr_lambda(warmup: int, total: int, kind: str):
    """Linear warmup, then constant, linear-to-zero or cosine-to-zero."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints whose meta.json exists (written last), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def find_resume_checkpoint(cfg: Config) -> Path | None:
    r = cfg.checkpoint.resume
    if r == "never":
        return None
    if r == "auto":
        ckpts = complete_checkpoints(run_paths(cfg).ckpt)
        return ckpts[-1] if ckpts else None
    p = Path(r)
    if not (p / "meta.json").is_file():
        raise ConfigError(f"checkpoint.resume: got {r!r}, expected auto, never or a complete checkpoint directory")
    return p


def preflight(cfg: Config) -> None:
    """Fail fast, before any process is spawned or anything is written."""
    ds = cfg.dataset
    load_pairs(ds.dataset_name, ds.subset, ds.data_dirs, log=None)
    resolve_model(cfg.policy_model)
    resolve_model(cfg.ref_model_path)
    paths = run_paths(cfg)
    if find_resume_checkpoint(cfg) is None:
        leftovers = [p for p in (paths.metrics, paths.save / "model.safetensors", paths.tail) if p.exists()]
        if leftovers:
            raise ConfigError(
                f"dpo_training.save_dir: {paths.save} already holds a run ({leftovers[0].name}) and no checkpoint "
                "to resume; choose another save_dir (nothing was changed)")


class DPOTrainer:
    """Full-parameter DPO with FSDP2 on one process, several ranks, or several nodes.

    Features:
      - FSDP2 ``fully_shard`` per decoder layer (found from ``_no_split_modules`` or
        ``dpo_training.fsdp_layer_cls``) then the root; gloo on CPU, nccl on GPU. With one
        process there is nothing to shard: the model runs unwrapped (bf16 through autocast).
      - LM head (vocabulary projection) only at positions that predict a response token, and
        each micro-batch's chosen+rejected rows forwarded in length-sorted groups, each padded
        only to its own longest row, split to minimise padded tokens plus a per-forward cost
        (``group_by_length``; on by default for one process).
      - Frozen reference model sharded the same way, or reference log-probs precomputed
        once and cached on disk (``precompute_ref_log_probs``).
      - Precision: fp32 on CPU; bf16 compute with fp32 master weights, gradients
        reduced in fp32 and fp32 (fused) AdamW state on GPU (``MixedPrecisionPolicy``).
      - Losses: sigmoid/cDPO, robust, hinge, IPO, reference-free; summed or length-averaged log-probs.
      - Gradient accumulation (gradient sync only on the last micro-batch), clipping,
        linear warmup then constant/linear/cosine decay, activation checkpointing.
      - Tail test on all-gathered margins with optional adaptive beta (``hhdpo.tail``).
      - Metrics to ``metrics.jsonl``, W&B (rank 0) and a tqdm bar; validation every ``eval_steps``.
      - DCP sharded checkpoints every ``save_steps`` holding model, optimizer, scheduler,
        data position, RNG, tail-test state and beta; ``resume: auto`` picks the newest
        complete one; SIGTERM/SIGUSR2 finish the step, save and exit 42.
      - Final Hugging Face directory (safetensors, config, tokenizer, chat template)
        gathered from the shards, loadable by ``from_pretrained`` and vLLM.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.dpo_training
        self.device, backend, self.dtype = resolve_runtime(cfg)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.paths = run_paths(cfg)
        self._seed_everything(t.seed)
        self._stop_signal = 0
        for s in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(s, self._on_signal)

        resume_from = find_resume_checkpoint(cfg)
        self._log(f"[train] world={self.world} device={self.device} backend={backend} dtype={self.dtype} "
                  f"resume={'from ' + str(resume_from) if resume_from else 'no'}")

        # data: every rank parses and tokenizes (cheap); indices decide who trains on what
        self.tokenizer = load_tokenizer(cfg.policy_model, cfg.trust_remote_code)
        ds = cfg.dataset
        pairs, _ = load_pairs(ds.dataset_name, ds.subset, ds.data_dirs, log=self._log)
        self.examples = tokenize_pairs(pairs, self.tokenizer, ds, progress=self.is_main)
        self.train_idx, self.val_idx = train_val_split(len(pairs), ds.val_ratio, ds.seed)
        per_rank = len(self.train_idx) // self.world // t.batch_size
        self.steps_per_epoch = per_rank // t.gradient_accumulation_steps
        if self.steps_per_epoch < 1:
            raise DataError(f"{len(self.train_idx)} training pairs are too few for {self.world} ranks x batch_size "
                            f"{t.batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps}")
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.steps_per_epoch
        # under FSDP every extra forward gathers the parameters again (measured slower on 2 CPU ranks)
        self.group_by_length = t.group_by_length if t.group_by_length is not None else self.world == 1

        # models
        self.policy, self.hf_config, self.arch = self._build_model(cfg.policy_model, trainable=True)
        self.ref_logps = None
        self.ref = None
        if not t.reference_free:
            if t.precompute_ref_log_probs:
                self.ref_logps = self._precomputed_ref_logps()
            else:
                self.ref, _, _ = self._build_model(cfg.ref_model_path, trainable=False)
        # fused: one kernel over all parameters (2.7x faster step than foreach on CPU; on DTensors too)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(t.warmup_steps, self.total_steps, t.lr_scheduler))

        tail_warmup = cfg.tail_test.warmup_steps if cfg.tail_test.warmup_steps is not None else t.warmup_steps
        self.tail = TailTest(cfg.tail_test, tail_warmup, t.dpo_beta, self.paths.tail if self.is_main else None)
        self.beta = t.dpo_beta
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch already consumed
        self.window: dict[str, float] = {}
        self.last_saved_step = -1
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        if self.is_main:
            save_config(cfg, self.paths.save, previous_tag=f"before_step_{self.step:07d}", log=self._log)
            for name in ("global_margins_log.jsonl", "global_tail_test_and_beta_log.jsonl"):
                truncate_after_step(self.paths.tail / name, self.step)
        self.logger = MetricsLogger(self.paths.metrics, cfg, self.is_main, resume_step=self.step)

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
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # fp32 master weights always; bf16/fp16 only as FSDP's compute dtype
        model = load_model(spec, dtype=torch.float32, trust_remote_code=self.cfg.trust_remote_code)
        hf_config = copy.deepcopy(model.config)
        arch = type(model).__name__
        model.config.use_cache = False
        if trainable and self.cfg.dpo_training.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device)
        if self.world > 1:
            mesh = init_device_mesh(self.device.type, (self.world,))
            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32) if self.dtype != torch.float32 else MixedPrecisionPolicy()
            layer_cls = decoder_layer_classes(model, self.cfg.dpo_training.fsdp_layer_cls)
            for module in model.modules():
                if isinstance(module, layer_cls):
                    fully_shard(module, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
        elif not trainable:
            model.to(self.dtype)  # a frozen model needs no fp32 master copy
        model.train(trainable)
        if not trainable:
            model.requires_grad_(False)
        return model, hf_config, arch

    # ------------------------------------------------------------------ forward

    def _batch(self, idxs: list[int]) -> dict:
        groups = collate_groups([self.examples[i] for i in idxs], self.tokenizer.pad_token_id, self.group_by_length)
        groups = [{k: v.to(self.device, non_blocking=True) for k, v in g.items()} for g in groups]
        return {"groups": groups, "n": len(idxs), "tokens": sum(g["attention_mask"].sum() for g in groups)}

    def _autocast(self):
        # FSDP casts parameters itself; a single unwrapped process uses autocast for bf16/fp16
        if self.world == 1 and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed (or averaged) response log-probs of the chosen and rejected rows of ``batch``."""
        logps, rows = [], []
        for g in batch["groups"]:
            at = scored_positions(g["labels"])
            with self._autocast(), lm_head_only_at(model, at):
                logits = model(input_ids=g["input_ids"], attention_mask=g["attention_mask"], use_cache=False).logits
            if logits.dim() != 2:
                raise RuntimeError(f"{type(model).__name__} does not call its output embedding on the hidden states; "
                                   "the response-only LM head cannot be used with it")
            logps.append(token_logps(logits, g["labels"][:, 1:][at[:, :-1]]))
            rows.append(g["rows"][:, None].expand_as(at)[at])
        n = batch["n"]
        lp = packed_sequence_logps(torch.cat(logps), torch.cat(rows), 2 * n, self.cfg.dpo_training.average_log_prob)
        return lp[:n], lp[n:]

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
        """Reference log-probs of every pair, computed once and cached on disk."""
        cfg, ds = self.cfg, self.cfg.dataset
        ref_path = Path(resolve_model(cfg.ref_model_path))
        weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in ref_path.glob("*.safetensors")) if ref_path.is_dir() else []
        key = hashlib.sha256(json.dumps([
            str(ref_path), weights, ds.dataset_name, ds.subset, ds.data_dirs, ds.max_len, ds.max_prompt_len,
            ds.use_chat_template, len(self.examples), cfg.dpo_training.average_log_prob, str(self.dtype),
        ]).encode()).hexdigest()[:16]
        cache = cache_dir() / "ref_logps" / f"{key}.pt"
        if cache.is_file():
            self._log(f"[train] reference log-probs from cache {cache}")
            c, r = torch.load(cache)
            return c, r
        ref, _, _ = self._build_model(cfg.ref_model_path, trainable=False)
        n, bs = len(self.examples), self.cfg.dpo_training.batch_size
        chunk = math.ceil(n / self.world)
        mine = list(range(self.rank * chunk, min(n, (self.rank + 1) * chunk)))
        mine += [0] * (chunk - len(mine))  # equal forward counts keep FSDP collectives in step
        out = torch.zeros(2, chunk, device=self.device)
        from tqdm.auto import tqdm

        with torch.no_grad():
            for s in tqdm(range(0, chunk, bs), desc="ref log-probs", disable=not self.is_main):
                idxs = mine[s:s + bs]
                c, r = self._logps(ref, self._batch(idxs))
                out[0, s:s + len(idxs)], out[1, s:s + len(idxs)] = c.float(), r.float()
        gathered = [torch.zeros_like(out) for _ in range(self.world)]
        dist.all_gather(gathered, out)
        allc = torch.cat([g[0] for g in gathered])[:n].cpu()
        allr = torch.cat([g[1] for g in gathered])[:n].cpu()
        del ref
        gc.collect()  # FSDP wrappers hold reference cycles; free the model's memory now
        if self.is_main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save((allc, allr), tmp)
            os.replace(tmp, cache)
        return allc, allr

    # ------------------------------------------------------------------ training

    def train_step(self, group: list[list[int]]) -> tuple[dict, np.ndarray]:
        """One optimizer step over ``group`` micro-batches; returns summed stats and local margins."""
        t = self.cfg.dpo_training
        ga = len(group)
        sums = torch.zeros(8, device=self.device, dtype=torch.float64)
        margins = []
        for i, idxs in enumerate(group):
            batch = self._batch(idxs)
            if self.world > 1:
                self.policy.set_requires_gradient_sync(i == ga - 1)
            pc, pr = self._logps(self.policy, batch)
            rc, rr = self._ref(idxs, batch)
            losses, cr, rj = preference_loss(pc, pr, rc, rr, self.beta, t.loss_type, t.label_smoothing, t.reference_free)
            (losses.mean() / ga).backward()
            margins.append(implicit_margins(pc, pr, rc, rr).float())
            sums += torch.stack([
                losses.detach().sum(), cr.sum(), rj.sum(), (cr > rj).float().sum(), pc.detach().sum(), pr.detach().sum(),
                torch.tensor(float(len(idxs)), device=self.device), batch["tokens"],
            ]).double()
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        dist.all_reduce(sums)
        local = torch.cat(margins)
        gathered = torch.zeros(self.world * local.numel(), device=self.device, dtype=local.dtype)
        _all_gather(gathered, local)
        s = sums.tolist()
        stats = {"loss": s[0], "rewards/chosen": s[1], "rewards/rejected": s[2], "rewards/accuracies": s[3],
                 "logps/chosen": s[4], "logps/rejected": s[5], "n": s[6], "tokens": s[7],
                 "grad_norm": float(grad_norm), "lr": lr}
        return stats, gathered.cpu().numpy()

    def _accumulate(self, stats: dict, seconds: float) -> None:
        w = self.window
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "n", "tokens"):
            w[k] = w.get(k, 0.0) + stats[k]
        w["grad_norm_sum"] = w.get("grad_norm_sum", 0.0) + stats["grad_norm"]
        w["steps"] = w.get("steps", 0) + 1
        w["seconds"] = w.get("seconds", 0.0) + seconds
        w["lr"] = stats["lr"]

    def _flush_window(self) -> dict:
        w, self.window = self.window, {}
        n = w["n"]
        rec = {"step": self.step, "epoch": self.epoch + self.batch_in_epoch / max(1, self.steps_per_epoch * self.cfg.dpo_training.gradient_accumulation_steps)}
        rec["loss"] = w["loss"] / n
        for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
            rec[k] = w[k] / n
        rec["rewards/margins"] = rec["rewards/chosen"] - rec["rewards/rejected"]
        rec["grad_norm"] = w["grad_norm_sum"] / w["steps"]
        rec["lr"] = w["lr"]
        rec["beta"] = self.beta
        rec["tokens/s"] = w["tokens"] / max(w["seconds"], 1e-9)
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict:
        t = self.cfg.dpo_training
        if len(self.val_idx) < self.world * t.batch_size:
            return {}
        self.policy.eval()
        sums = torch.zeros(5, device=self.device, dtype=torch.float64)
        for local in rank_batches(len(self.val_idx), t.batch_size, self.rank, self.world, 0, self.cfg.dataset.seed):
            idxs = [int(self.val_idx[i]) for i in local]
            batch = self._batch(idxs)
            pc, pr = self._logps(self.policy, batch)
            rc, rr = self._ref(idxs, batch)
            losses, cr, rj = preference_loss(pc, pr, rc, rr, self.beta, t.loss_type, t.label_smoothing, t.reference_free)
            sums += torch.stack([losses.sum(), cr.sum(), rj.sum(), (cr > rj).float().sum(),
                                 torch.tensor(float(len(idxs)), device=self.device)]).double()
        self.policy.train()
        dist.all_reduce(sums)
        s = sums.tolist()
        n = s[4]
        return {"step": self.step, "eval/loss": s[0] / n, "eval/rewards/chosen": s[1] / n, "eval/rewards/rejected": s[2] / n,
                "eval/rewards/margins": (s[1] - s[2]) / n, "eval/rewards/accuracies": s[3] / n, "eval/n": int(n)}

    def train(self) -> int:
        """Run to ``total_steps``; returns the process exit status (0 or EXIT_PREEMPTED)."""
        from tqdm.auto import tqdm

        t = self.cfg.dpo_training
        ga = t.gradient_accumulation_steps
        self._write_state("running")
        bar = tqdm(total=self.total_steps, initial=self.step, desc="dpo", disable=not self.is_main, dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                batches = rank_batches(len(self.train_idx), t.batch_size, self.rank, self.world, self.epoch, self.cfg.dataset.seed)
                usable = len(batches) // ga * ga
                while self.batch_in_epoch < usable and self.step < self.total_steps:
                    group = [[int(self.train_idx[i]) for i in b] for b in batches[self.batch_in_epoch:self.batch_in_epoch + ga]]
                    t0 = time.perf_counter()
                    stats, margins = self.train_step(group)
                    self.step += 1
                    self.batch_in_epoch += ga
                    self._accumulate(stats, time.perf_counter() - t0)
                    if self.cfg.tail_test.enabled:
                        self.tail.update(margins, self.step, self.epoch)
                        self.beta = self.tail.beta
                    bar.update(1)
                    if self.step % t.log_steps == 0 or self.step == self.total_steps:
                        rec = self._flush_window()
                        self.logger.log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['rewards/accuracies']:.2f}", tps=f"{rec['tokens/s']:.0f}")
                    if t.eval_steps and self.step % t.eval_steps == 0 and self.step < self.total_steps:
                        self.logger.log(self.evaluate())
                    if self.cfg.checkpoint.save_steps and self.step % self.cfg.checkpoint.save_steps == 0:
                        self.save_checkpoint()
                    self._check_preemption()
                if self.batch_in_epoch >= usable:
                    self.epoch += 1
                    self.batch_in_epoch = 0
            bar.close()
            ev = self.evaluate()
            if ev:
                self.logger.log(ev)
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

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.policy, self.opt)
        return {"model": msd, "optim": osd}

    def save_checkpoint(self) -> Path:
        """DCP sharded checkpoint; written to a temp dir, meta.json last, then renamed."""
        import torch.distributed.checkpoint as dcp

        root = self.paths.ckpt
        final = root / f"{CKPT_PREFIX}{self.step:07d}"
        tmp = root / f".{final.name}.partial"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed job
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._state(), checkpoint_id=str(tmp))
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, tmp / f"rng_rank{self.rank}.pt")
        dist.barrier()
        if self.is_main:
            # the data position as pairs used (not this run's micro-batch count): valid for any world/batch size
            trainer = {"step": self.step, "epoch": self.epoch, "beta": self.beta,
                       "pairs_in_epoch": self.batch_in_epoch * self.cfg.dpo_training.batch_size * self.world,
                       "tail": self.tail.state_dict(), "scheduler": self.sched.state_dict(), "window": self.window,
                       "world": self.world}
            torch.save(trainer, tmp / "trainer_state.pt")
            atomic_write_json(tmp / "meta.json", {"step": self.step, "epoch": self.epoch, "world": self.world, "time": time.time()})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in complete_checkpoints(root)[:-self.cfg.checkpoint.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        self.last_saved_step = self.step
        self._log(f"[ckpt] saved {final}")
        return final

    def _load_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.policy, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        tr = torch.load(path / "trainer_state.pt", weights_only=False)
        self.sched.load_state_dict(tr["scheduler"])
        self.step, self.epoch = tr["step"], tr["epoch"]
        self.batch_in_epoch, repeated = resume_batch_index(tr["pairs_in_epoch"], self.cfg.dpo_training.batch_size, self.world)
        if repeated:
            self._log(f"[ckpt] warning: {tr['pairs_in_epoch']} pairs of epoch {self.epoch} were used, not a whole number "
                      f"of this run's micro-batches; {repeated} of them are seen again")
        self.beta, self.window = tr["beta"], tr["window"]
        self.tail.load_state_dict(tr["tail"])
        rng_file = path / f"rng_rank{self.rank}.pt"
        if tr["world"] == self.world and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.last_saved_step = self.step
        self._log(f"[ckpt] resumed from {path} at step {self.step} (epoch {self.epoch}, micro-batch {self.batch_in_epoch})")

    def export_hf(self) -> Path:
        """Gather the shards into a Hugging Face directory in save_dir (rank 0 writes)."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        save = self.paths.save
        if self.is_main:
            out_dtype = torch.float32 if self.dtype == torch.float32 else self.dtype
            if getattr(self.hf_config, "tie_word_embeddings", False):
                sd.pop("lm_head.weight", None)
            sd = {k: v.to(out_dtype).contiguous() for k, v in sd.items()}
            split = split_torch_state_dict_into_shards(sd, max_shard_size="5GB")
            for fname, keys in split.filename_to_tensors.items():
                tmp = save / f".{fname}.tmp"
                save_file({k: sd[k] for k in keys}, str(tmp), metadata={"format": "pt"})
                os.replace(tmp, save / fname)
            if split.is_sharded:
                atomic_write_json(save / "model.safetensors.index.json",
                                  {"metadata": {}, "weight_map": split.tensor_to_filename})
            cfg = copy.deepcopy(self.hf_config)
            cfg.architectures = [self.arch]
            cfg.dtype = out_dtype
            cfg.use_cache = True
            cfg.save_pretrained(save)
            self.tokenizer.save_pretrained(save)
            self._log(f"[train] saved Hugging Face model to {save}")
        dist.barrier()
        return save


# ---------------------------------------------------------------------------- entry points


def run(cfg: Config) -> int:
    """Worker entry point (inside a process group)."""
    try:
        return DPOTrainer(cfg).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> int:
    ap = StageParser("hhdpo train", __doc__, config_help="YAML config file (e.g. configs/smollm2_cpu.yaml)",
                     epilog="config keys (override any as section.key=value, e.g. dpo_training.dpo_beta=0.05):\n"
                     + config_reference())
    ap.flag("nproc_per_node", type=int, default=1, metavar="N",
            help="ranks to start when not already under torchrun/srun (default 1)")
    args = ap.parse(argv)

    def body() -> int:
        cfg = load_stage_config(args)
        distributed = in_distributed_env() or adopt_slurm_env()
        if not distributed or int(os.environ.get("RANK", 0)) == 0:
            preflight(cfg)
        if not distributed:
            fwd = _strip_nproc(list(argv if argv is not None else sys.argv[1:]))
            return run_under_torchrun("hhdpo.train", fwd, args.nproc_per_node, run_paths(cfg).state)
        return run(cfg)

    return run_stage("hhdpo train", body)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc-per-node", "--nproc_per_node"):
            skip = True
            continue
        if a.startswith(("--nproc-per-node=", "--nproc_per_node=")):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(cli())
