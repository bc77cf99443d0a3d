"""bench/train_throughput.py's children, each run in its own process: hhdpo's trainer, TRL's
DPOTrainer and the matmul peak, on the same pairs and micro-batches (see that script's docstring)."""

from __future__ import annotations

import os
import resource
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LR, BETA, WARMUP_LR, MAX_GRAD_NORM = 5e-6, 0.1, 5, 10.0  # given to both trainers (lr/beta/clip as in smollm2_cpu.yaml)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, CPU s busy on the whole machine incl. steal, CPU s used by this process)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime


def others_cores(s0: tuple, s1: tuple) -> float:
    """Average number of cores busy with anything but this process between two snapshots."""
    return max(0.0, ((s1[1] - s0[1]) - (s1[2] - s0[2])) / max(s1[0] - s0[0], 1e-9))


def hhdpo_overrides(a, precision: str, precompute: bool, save_dir: str, batching: str = "padded") -> list[str]:
    """``batching``: padded, pf (padding-free) or sp (padding-free, each prompt once)."""
    import dataclasses

    from hhdpo.core.config_schema import DPOTrainingConfig

    # explicit either way: their null defaults are on on CPU; a checkout without a key runs without it
    keys = {f.name for f in dataclasses.fields(DPOTrainingConfig)}
    for key, mode in (("padding_free", "pf"), ("share_prompt", "sp")):
        if batching in (mode, "sp") and key not in keys:
            raise SystemExit(f"this checkout has no dpo_training.{key}")
    pf = [f"dpo_training.padding_free={'false' if batching == 'padded' else 'true'}"] if "padding_free" in keys else []
    pf += [f"dpo_training.share_prompt={'true' if batching == 'sp' else 'false'}"] if "share_prompt" in keys else []
    return pf + [
        f"dataset.dataset_name={a.data}", f"dataset.subset=test[:{a.raw_rows}]", "dataset.val_ratio=0",
        f"dataset.max_len={a.max_len}", f"dataset.max_prompt_len={a.max_prompt_len}",
        f"precision={precision}", "device=cpu",
        f"dpo_training.batch_size={a.batch_size}", "dpo_training.gradient_accumulation_steps=1",
        f"dpo_training.max_steps={a.steps}", f"dpo_training.learning_rate={LR}", f"dpo_training.dpo_beta={BETA}",
        "dpo_training.loss_type=sigmoid", f"dpo_training.warmup_steps={WARMUP_LR}", "dpo_training.lr_scheduler=cosine",
        f"dpo_training.max_grad_norm={MAX_GRAD_NORM}", "dpo_training.activation_checkpointing=false",
        f"dpo_training.precompute_ref_log_probs={'true' if precompute else 'false'}",
        f"dpo_training.save_dir={save_dir}", "checkpoint.save_steps=0", "checkpoint.resume=never",
        "wandb.mode=disabled",
    ]


def micro_batches(a) -> list[list[int]]:
    """Pairs 0..P-1 in file order, batch_size at a time; steps cycle over them."""
    n = a.pairs // a.batch_size * a.batch_size
    return [list(range(i, i + a.batch_size)) for i in range(0, n, a.batch_size)]


def window(ends: list[float], tokens: list[int], warmup: int) -> tuple[float, int]:
    """Seconds and tokens from the end of step `warmup` to the end of the last step."""
    return ends[-1] - ends[warmup - 1], sum(tokens[warmup:])


def profile_table(prof, limit: int = 30) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=limit, max_name_column_width=60)


# ---------------------------------------------------------------------------- children


def child_hhdpo(a, precision: str, precompute: bool, batching: str) -> dict:
    from hhdpo.evaluation.serve import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch

    torch.set_num_threads(a.threads)
    import torch.distributed as dist

    import hhdpo.training.trainer as ht
    from hhdpo.core.config import load_config

    extra = {}
    orig = ht.DPOTrainer._precomputed_ref_logps

    def timed_precompute(self):
        t0 = time.perf_counter()
        out = orig(self)
        extra["precompute_s"] = time.perf_counter() - t0
        return out

    ht.DPOTrainer._precomputed_ref_logps = timed_precompute
    save_dir = tempfile.mkdtemp(prefix="hhdpo-bench-", dir=os.environ.get("HHDPO_CACHE"))  # removed by the parent
    cfg = load_config(REPO / "configs/smollm2_cpu.yaml", hhdpo_overrides(a, precision, precompute, save_dir, batching))
    t0 = time.perf_counter()
    trainer = ht.DPOTrainer(cfg)
    init_s = time.perf_counter() - t0
    if len(trainer.examples) != a.pairs:
        raise SystemExit(f"expected {a.pairs} pairs, hhdpo parsed {len(trainer.examples)}")
    rss_init = peak_rss_gb()
    batches = micro_batches(a)
    ends, tokens, logps_c = [], [], []
    prof = None
    snap = {}
    for s in range(a.steps):
        if a.profile and s == a.warmup:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        stats, _ = trainer.train_step([batches[s % len(batches)]])
        ends.append(time.perf_counter())
        if s == a.warmup - 1:
            snap["start"] = cpu_snapshot()
        tokens.append(int(stats["tokens"]))
        logps_c.append(stats["logps/chosen"] / stats["n"])
        extra["torch_threads"] = torch.get_num_threads()
        if prof is not None and s == a.warmup + a.profile - 1:
            prof.__exit__(None, None, None)
            extra["profile"] = profile_table(prof)
            break
    secs, tok = window(ends, tokens, a.warmup)
    extra["others_cores"] = others_cores(snap["start"], cpu_snapshot())
    dist.destroy_process_group()
    return {"init_s": init_s, "steps": len(ends), "tokens_per_step": tokens, "timed_s": secs, "timed_tokens": tok,
            "timed_pairs": a.batch_size * (len(ends) - a.warmup), "peak_rss_gb": peak_rss_gb(), "peak_rss_init_gb": rss_init,
            "logps_chosen_mean": logps_c, **extra}


def child_trl(a, precision: str, precompute: bool) -> dict:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)  # a single plain process: no accelerate/torch.distributed launch
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from hhdpo.core.config import load_config
    from hhdpo.core.models import load_tokenizer, resolve_model
    from hhdpo.data.hh import load_pairs, tokenize_pair, tokenize_pairs

    cfg = load_config(REPO / "configs/smollm2_cpu.yaml", hhdpo_overrides(a, precision, precompute, "/nonexistent"))
    ds_cfg = cfg.dataset
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.policy_model)
    pairs, _ = load_pairs(ds_cfg.dataset_name, ds_cfg.subset, ds_cfg.data_dirs, log=None)
    if len(pairs) != a.pairs:
        raise SystemExit(f"expected {a.pairs} pairs, parsed {len(pairs)}")
    train_ds = Dataset.from_list(tokenize_pairs(pairs, tok, ds_cfg))
    extra = {}

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already hhdpo's token ids (same template, same truncation)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            extra["precompute_s"] = time.perf_counter() - t
            return out

    ends: list[float] = []
    logps_c: list[float] = []
    holder = {}

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            if state.global_step == a.warmup:
                holder["snap"] = cpu_snapshot()
            extra["torch_threads"] = torch.get_num_threads()  # accelerate must not have changed it
            m = holder["trainer"]._metrics["train"].get("logps/chosen")  # cleared by the final log(): read per step
            if m:
                logps_c.append(float(m[-1]))

    out_dir = tempfile.mkdtemp(prefix="trl-bench-", dir=os.environ.get("HHDPO_CACHE"))  # removed by the parent
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
        max_steps=a.steps, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP_LR,
        max_grad_norm=MAX_GRAD_NORM, beta=BETA, loss_type=["sigmoid"], max_length=a.max_len,
        gradient_checkpointing=False, precompute_ref_log_probs=precompute,
        bf16=precision == "bf16", fp16=False, use_cpu=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, train_sampling_strategy="sequential",
        logging_strategy="no", eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        seed=42,
    )
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.policy_model), dtype=torch.float32)
    trainer = BenchDPOTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok, callbacks=[StepTimer()])
    holder["trainer"] = trainer
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    init_s = time.perf_counter() - t0
    rss_init = peak_rss_gb()
    if a.profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

        class Prof(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == a.warmup:
                    prof.__enter__()
                elif state.global_step == a.warmup + a.profile:
                    prof.__exit__(None, None, None)
                    extra["profile"] = profile_table(prof)
                    control.should_training_stop = True

        trainer.add_callback(Prof())
    trainer.train()
    extra["others_cores"] = others_cores(holder["snap"], cpu_snapshot())
    rss = peak_rss_gb()
    n = len(ends)
    tokens = tokens[:n]  # accelerate's loader collates one batch ahead
    secs, tok_count = window(ends, tokens, a.warmup)

    # how TRL's own conversational tokenization (same chat template) compares with hhdpo's, untruncated,
    # and what TRL's max_length cut (no max_prompt_length in TRL 1.16) would do to these pairs
    conv = Dataset.from_list([{"prompt": p.prompt_messages, "chosen": p.chosen_messages, "rejected": p.rejected_messages}
                              for p in pairs])
    no_cut = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    mine = DPOTrainer._prepare_dataset(trainer, conv, tok, no_cut, "check")
    same_prompt = same_all = over = prompt_over = 0
    example_diff = None
    for p, t in zip(pairs, mine, strict=True):
        h = tokenize_pair(p, tok, 10**6, 10**6 - 1, True)
        same_prompt += h["prompt_ids"] == t["prompt_ids"]
        ok = all(h[k] == t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        same_all += ok
        if not ok and example_diff is None:
            example_diff = {"hhdpo_chosen_tail": tok.decode(h["chosen_ids"][-3:]), "trl_chosen_tail": tok.decode(t["chosen_ids"][-3:])}
        longest = len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"]))
        over += longest > a.max_len
        prompt_over += len(t["prompt_ids"]) >= a.max_len
    return {"init_s": init_s, "steps": n, "tokens_per_step": tokens, "timed_s": secs, "timed_tokens": tok_count,
            "timed_pairs": a.batch_size * (n - a.warmup), "peak_rss_gb": rss, "peak_rss_init_gb": rss_init,
            "logps_chosen_mean": logps_c, "optim": args.optim,
            "trl_own_tokenization": {"pairs": len(pairs), "same_prompt": same_prompt, "same_all": same_all,
                                     "first_diff": example_diff, "over_max_len": over, "prompt_over_max_len": prompt_over},
            **extra}


def child_matmul(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    out = {}
    s0 = cpu_snapshot()
    n = 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[:1 if a.skip_bf16 else 2]:
        x = torch.randn(n, n, dtype=dtype)
        y = torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            torch.mm(x, y)
        best = float("inf")
        for _ in range(a.matmul_reps):
            t0 = time.perf_counter()
            torch.mm(x, y)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best
    out["others_cores"] = others_cores(s0, cpu_snapshot())
    return out
