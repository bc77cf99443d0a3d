"""Host memory per rank while training (policy + live reference + gradients + AdamW), on CPU.

Each configuration runs in fresh torchrun workers (gloo, fp32); every rank builds the real
DPOTrainer on SmolLM2-135M-Instruct (``smollm2``) and HH pairs, then runs the same micro-batches
(16 per rank by default) through ``DPOTrainer.train_step``: 16 optimizer steps at accumulation 1,
two at 8, so both peaks cover the same longest micro-batch, and micro-batches that run with the
AdamW state already allocated (it comes at the first step; with one step at accumulation 8 no
micro-batch would). No checkpoint or export, which gather the model. Per rank:

    base      RSS after the imports and the process group, before the trainer
    setup     RSS once the trainer is built (tokenizer, data, policy, reference)
    peak      peak RSS during the training steps (VmHWM reset before them, cross-checked by a
              2 ms VmRSS sampler; bench/setup_memory.PeakRSS)
    used      peak - base: what the models, their gradients, AdamW and the activations take

glibc is told to serve every block above 64 KiB with its own mmap (MALLOC_MMAP_THRESHOLD_), so
freed tensors leave RSS at once and the peak is the live peak, not allocator slack.

Configurations: 1 process (unwrapped) and 2 FSDP ranks, accumulation 1 and 8, and 2 ranks with
``dpo_training.defer_grad_sync: true`` (gradients kept unsharded until the last micro-batch).
Prints the per-rank figures and the ratios side by side. Not a test.

What to expect: accumulating at all keeps the (sharded) gradients alive through the next
micro-batches' forwards, about 4 B x N / ranks over accumulation 1, which frees them at every
step; deferring the sync adds the rest of the unsharded gradient, 4 B x N x (1 - 1/ranks).

    python bench/train_memory.py              # ~20 min on 2 cores
    python bench/train_memory.py --micro-batches 32 --batch-size 2 --model <dir>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: setup_memory's PeakRSS
GB = 1e9

CONFIGS = {  # name: (ranks, accumulation, defer_grad_sync)
    "1 process, accum 1": (1, 1, False),
    "1 process, accum 8": (1, 8, False),
    "2 ranks, accum 1": (2, 1, False),
    "2 ranks, accum 8": (2, 8, False),
    "2 ranks, accum 8, defer_grad_sync": (2, 8, True),
}


def _rss() -> int:
    from setup_memory import _status_kb

    return _status_kb("VmRSS") * 1024


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from hhdpo.core.config import load_config
    from hhdpo.data.batching import rank_batches
    from hhdpo.training.trainer import DPOTrainer
    from setup_memory import PeakRSS

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = _rss()
    cfg = load_config(REPO / "configs/smollm2_cpu.yaml", [
        f"policy_model={args.model}", f"ref_model={args.model}", f"dataset.dataset_name={args.data}",
        "dataset.subset=train[:256]", "dataset.val_ratio=0", f"dataset.max_len={args.max_len}",
        f"dataset.max_prompt_len={args.max_len * 2 // 3}",
        f"dpo_training.batch_size={args.batch_size}", f"dpo_training.gradient_accumulation_steps={args.accum}",
        f"dpo_training.defer_grad_sync={str(args.defer).lower()}", "dpo_training.group_by_length=false",
        f"dpo_training.max_steps={args.micro_batches // args.accum}", f"dpo_training.save_dir={args.out}/run-{args.name}",
        "checkpoint.save_steps=0", "checkpoint.resume=never", "tail_test.enabled=false"])
    tr = DPOTrainer(cfg)
    setup = _rss()
    t = cfg.dpo_training
    batches = rank_batches(len(tr.train_idx), t.batch_size, tr.rank, tr.world, 0, cfg.dataset.seed)
    t0 = time.perf_counter()
    steps = args.micro_batches // args.accum
    with PeakRSS() as mem:
        for s in range(steps):
            tr.train_step([[int(tr.train_idx[i]) for i in b] for b in batches[s * args.accum:(s + 1) * args.accum]])
    seconds = time.perf_counter() - t0
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in tr.policy.parameters())
    total = sum(p.numel() for p in tr.policy.parameters())  # a DTensor's numel is the whole tensor's
    Path(args.out, f"{args.name}_rank{tr.rank}.json").write_text(json.dumps({
        "base": base, "setup": setup, "peak": mem.peak, "start": mem.start, "hwm_reset": mem.hwm_reset,
        "policy_params_held": held, "policy_params": total, "seconds": seconds, "steps": steps}))
    tr.logger.close()
    dist.destroy_process_group()


def run(name: str, ranks: int, accum: int, defer: bool, a, out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tag = name.replace(" ", "").replace(",", "_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
           "--worker", "--name", tag, "--accum", str(accum), "--micro-batches", str(a.micro_batches),
           "--batch-size", str(a.batch_size), "--max-len", str(a.max_len),
           "--model", a.model, "--data", a.data, "--out", str(out)] + (["--defer"] if defer else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{name}: workers failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    print(f"# {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return [json.loads((out / f"{tag}_rank{r}.json").read_text()) for r in range(ranks)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model spec (default: the smollm2 alias)")
    ap.add_argument("--data", default=None, help="HH .jsonl.gz (default: $HH_DATA or ../shared/data/hh-rlhf)")
    ap.add_argument("--micro-batches", type=int, default=16, help="micro-batches per rank (a multiple of 16)")
    ap.add_argument("--batch-size", type=int, default=1, help="pairs per rank per micro-batch")
    ap.add_argument("--max-len", type=int, default=128, help="dataset.max_len (prompt + response tokens)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--defer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0

    import torch

    from hhdpo.core.models import resolve_model

    if a.data is None:
        d = Path(os.environ.get("HH_DATA") or REPO.parent / "shared" / "data" / "hh-rlhf")
        a.data = str(d / "harmless-base-test.jsonl.gz" if d.is_dir() else d)
    a.model = resolve_model(a.model)
    print(f"# torch {torch.__version__}, {os.cpu_count()} cores; model {a.model}; {a.micro_batches} micro-batches of "
          f"{a.batch_size} pair(s) per rank, max_len {a.max_len}; fp32, gloo, live reference", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        for name, (ranks, accum, defer) in CONFIGS.items():
            results[name] = run(name, ranks, accum, defer, a, Path(tmp))
    n = results["1 process, accum 1"][0]["policy_params"]
    print(f"\n# policy parameters N = {n / 1e6:.1f}M: 4 B x N = {4 * n / GB:.2f} GB per fp32 copy "
          "(master weights, gradients, reference; AdamW 2 copies)")
    print("\n| configuration | rank | policy params held | base GB | setup GB | training peak GB | used (peak - base) GB | training added (peak - setup) GB | s/micro-batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, ranks in results.items():
        for r, x in enumerate(ranks):
            print(f"| {name} | {r} | {x['policy_params_held'] / 1e6:.1f}M | {x['base'] / GB:.2f} | {x['setup'] / GB:.2f} | "
                  f"{x['peak'] / GB:.2f} | {(x['peak'] - x['base']) / GB:.2f} | {(x['peak'] - x['setup']) / GB:.2f} | "
                  f"{x['seconds'] / a.micro_batches:.1f} |")

    def used(name):  # the larger rank's figure
        return max(x["peak"] - x["base"] for x in results[name])

    print("\nRATIOS of per-rank used memory (training peak - base; the larger rank):")
    print("| | accum 1 | accum 8 | accum 8 / accum 1 |")
    print("|---|---:|---:|---:|")
    rows = [("1 process", "1 process, accum 1", "1 process, accum 8"),
            ("2 ranks (default: reduce-scatter every micro-batch)", "2 ranks, accum 1", "2 ranks, accum 8"),
            ("2 ranks, defer_grad_sync", "2 ranks, accum 1", "2 ranks, accum 8, defer_grad_sync")]
    for label, one, eight in rows:
        print(f"| {label} | {used(one) / GB:.2f} GB | {used(eight) / GB:.2f} GB | {used(eight) / used(one):.2f} |")
    print(f"| 2 ranks / 1 process | {used('2 ranks, accum 1') / used('1 process, accum 1'):.2f} | "
          f"{used('2 ranks, accum 8') / used('1 process, accum 8'):.2f} | |")
    print(f"| 2 ranks defer / 1 process | | {used('2 ranks, accum 8, defer_grad_sync') / used('1 process, accum 8'):.2f} | |")
    extra = used("2 ranks, accum 8, defer_grad_sync") - used("2 ranks, accum 8")
    print(f"\ndefer_grad_sync costs {extra / GB:.2f} GB more per rank here (expected about 4 B x N x (1 - 1/2) = "
          f"{2 * n / GB:.2f} GB: the unsharded gradient instead of the shard); on Llama-3.1-8B (N = 8.03e9) on 8 GPUs "
          f"that is 4 B x N x 7/8 = {4 * 8.03e9 * 7 / 8 / GB:.0f} GB per GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
