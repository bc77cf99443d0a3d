"""The GPU paths on one CUDA device, through the package's own entry points (not a test).

Random-weight Llamas (nothing comes from the Hub; the tokenizer and chat template are those of
--tokenizer, by default SmolLM2's) are trained with ``hhdpo train`` on the real HH file, one
process (nccl on a GPU), as users run it:

  fp32              SmolLM2-135M's shape in fp32: the model unwrapped (nothing to shard)
  bf16              the same in bf16: FSDP2's mixed precision on a 1-rank mesh (bf16 parameters
                    cast from fp32 master weights, fp32 gradient reduce), the model built on the
                    meta device and its bf16 safetensors streamed into the shards: a multi-GPU
                    run's code path
  bf16-resume       bf16 stopped at half its steps (a DCP checkpoint), then resumed
  big-bf16          Llama-3.1-8B's layer shape (4096 hidden, 14336 MLP, 32 heads, 8 KV heads,
                    untied LM head) with --layers layers, activation checkpointing, max_len 512:
                    tokens/s after --warmup steps and the peak GPU memory (nvidia-smi, 200 ms)
  big-bf16-grouped  the same with dpo_training.group_by_length=true (the CPU default), side by side

then ``hhdpo generate --backend transformers`` samples from bf16's Hugging Face export on the
device (vLLM too, on a GPU where it is installed). Checks: every run exits 0 and logs the
expected world, device, backend, dtype and fsdp; bf16's first loss is exactly ln 2 (policy and
reference compute alike) and its first log-probs match fp32's (bf16 tolerance); bf16-resume
continues with bf16's losses; the export loads. Exits 1 if a check fails.

    make bench-gpu                    # = python bench/gpu_check.py [--out gpu.json]; ~7 min on one H100
    python bench/gpu_check.py --tokenizer DIR --data HH.jsonl.gz   # a tokenizer directory instead of smollm2
    python bench/gpu_check.py --device cpu --layers 1 --steps 2 --big-steps 3   # the same runs on CPU (tiny)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2_cpu.yaml"
# the HH file beside the checkout, as the Makefile and the tests find it (HH_DATA wins)
HH_DATA = os.environ.get("HH_DATA") or str(REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz")
SHAPES = {  # (hidden, MLP, layers, heads, KV heads, tied)
    "small": (576, 1536, 30, 9, 3, True),  # SmolLM2-135M
    "big": (4096, 14336, None, 32, 8, False),  # Llama-3.1-8B's layers
    "tiny": (64, 128, 2, 4, 2, True),  # --device cpu
}


def make_llama(out: Path, tok_dir: Path, shape: str, layers: int | None = None) -> int:
    """A random Llama of ``shape`` with ``tok_dir``'s tokenizer, stored bf16; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, mlp, n_layers, heads, kv, tied = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers or n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of ~1B parameters: seconds on a GPU
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the runs' memory is measured against what is in use before them
    return n


class GPUMemory:
    """Peak GPU memory (MiB) a block added over what was in use at its start (this process's
    CUDA context), from nvidia-smi polled every 200 ms; 0 without nvidia-smi."""

    QUERY = ("nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits")

    def __enter__(self):
        self.peak, self.proc = 0, None
        if shutil.which("nvidia-smi"):
            self.base = int(subprocess.run(self.QUERY, capture_output=True, text=True, check=True).stdout.split()[0])
            self.proc = subprocess.Popen([*self.QUERY, "-lms", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            out = self.proc.communicate()[0]
            self.peak = max((int(x) for x in out.split() if x.isdigit()), default=self.base) - self.base


def hhdpo(*args, log: Path) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "hhdpo", *map(str, args)], check=False, cwd=REPO, capture_output=True, text=True)
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def train(name: str, tmp: Path, model: Path, common: list[str], extra: list[str]) -> dict:
    run_dir = tmp / name
    with GPUMemory() as mem:
        rc, out, wall = hhdpo("train", "--config", CONFIG, "--nproc-per-node", 1, f"policy_model={model}",
                              f"ref_model={model}", f"run_dir={run_dir}", *common, *extra, log=tmp / f"{name}.log")
    metrics = run_dir / "model" / "metrics.jsonl"
    recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    head = next((x for x in out.splitlines() if x.startswith("[train] attempt=")), "")
    r = {"name": name, "rc": rc, "wall_s": round(wall, 1), "peak_gpu_mib": mem.peak, "log": head,
         "losses": [x["loss"] for x in recs if "loss" in x], "logps": [x["logps/chosen"] for x in recs if "loss" in x], "tokens_per_s": [x["tokens/s"] for x in recs if "tokens/s" in x],
         "eval_loss": next((x["eval/loss"] for x in recs if "eval/loss" in x), None)}
    print(f"[gpu-check] {name}: rc={rc} {wall:.0f} s peak {mem.peak} MiB | {head}", flush=True)
    if rc:
        print(out[-4000:], flush=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="smollm2", help="model (alias or directory) whose tokenizer to use (default: smollm2)")
    ap.add_argument("--data", type=Path, default=HH_DATA, help=f"the HH .jsonl.gz file (default: {HH_DATA})")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-shaped model (default 4)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of each small run (even)")
    ap.add_argument("--big-steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    a = ap.parse_args(argv)

    import torch

    cuda = a.device == "cuda"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": a.device}
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --device cpu for the CPU variant)")
        env.update(gpu=torch.cuda.get_device_name(0), nccl=".".join(map(str, torch.cuda.nccl.version())),
                   bf16=torch.cuda.is_bf16_supported())
    import transformers

    env["transformers"] = transformers.__version__
    print(f"[gpu-check] {env}", flush=True)
    small, big = ("small", "big") if cuda else ("tiny", "tiny")
    results, checks = {"env": env, "runs": []}, []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[gpu-check] {'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    from hhdpo.core.models import resolve_model

    tok_dir = Path(resolve_model(a.tokenizer))
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        n_small = make_llama(tmp / "small-model", tok_dir, small)
        n_big = make_llama(tmp / "big-model", tok_dir, big, a.layers)
        results.update(small_params=n_small, big_params=n_big)
        print(f"[gpu-check] random Llamas: small {n_small / 1e6:.0f}M, big {n_big / 1e6:.0f}M parameters", flush=True)
        data = [f"dataset.dataset_name={a.data}", f"HH_test.hh_test={a.data}", f"device={a.device}",
                "dpo_training.lr_scheduler=constant", "dpo_training.warmup_steps=2", "dpo_training.log_steps=1",
                "dpo_training.learning_rate=1e-5", "wandb.mode=disabled"]
        common = [*data, "dataset.subset=train[:640]", "dataset.val_ratio=0.05", "dataset.max_len=256",
                  "dataset.max_prompt_len=128", "dpo_training.batch_size=8", "checkpoint.save_steps=0"]
        half = a.steps // 2
        small_runs = [
            ("fp32", ["precision=fp32", f"dpo_training.max_steps={a.steps}"]),
            ("bf16", ["precision=bf16", f"dpo_training.max_steps={a.steps}"]),
            ("bf16-resume", ["precision=bf16", f"dpo_training.max_steps={half}", f"checkpoint.save_steps={half}"]),
            # the same run directory, now to the end: resumes from the checkpoint at `half`
            ("bf16-resume", ["precision=bf16", f"dpo_training.max_steps={a.steps}"]),
        ]
        for name, extra in small_runs:
            results["runs"].append(train(name, tmp, tmp / "small-model", common, extra))
        big_args = [*data, "precision=bf16", "dataset.subset=train[:1200]", "dataset.val_ratio=0", "dataset.max_len=512",
                    "dataset.max_prompt_len=256", "dpo_training.batch_size=4", f"dpo_training.max_steps={a.big_steps}",
                    "dpo_training.activation_checkpointing=true", "checkpoint.save_steps=0"]
        for name, extra in {"big-bf16": [], "big-bf16-grouped": ["dpo_training.group_by_length=true"]}.items():
            results["runs"].append(train(name, tmp, tmp / "big-model", big_args, extra))

        by = {r["name"]: r for r in results["runs"]}  # the second bf16-resume (the resumed one) wins
        for r in results["runs"]:
            bf16 = "bf16" in r["name"]
            want = (f"world=1 device={a.device}{':0' if cuda else ''} backend={'nccl' if cuda else 'gloo'} "
                    f"dtype=torch.{'bfloat16' if bf16 else 'float32'} fsdp={'yes' if bf16 else 'no'}")
            check(f"{r['name']} ran", r["rc"] == 0 and want in r["log"], f"rc={r['rc']} want '{want}' in '{r['log']}'")
        fp32, bf16, resumed = by["fp32"], by["bf16"]["losses"], by["bf16-resume"]["losses"]
        if fp32["logps"] and bf16:
            # policy = reference at step 1: the loss is ln 2 exactly when both compute alike
            check("bf16 step-1 loss = ln 2", abs(bf16[0] - math.log(2)) < 1e-6 * math.log(2), f"{bf16[0]:.7f}")
            x, y = by["bf16"]["logps"][0], fp32["logps"][0]
            check("bf16 step-1 log-probs = fp32's", abs(x - y) / abs(y) < 2e-2, f"{x:.4f} vs {y:.4f} (rel {abs(x - y) / abs(y):.1e})")
        if bf16 and len(resumed) == len(bf16):
            worst = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(resumed, bf16))
            check("resumed losses = uninterrupted losses", worst < (1e-2 if cuda else 1e-5), f"worst rel diff {worst:.1e} over {len(bf16)} steps")
        else:
            check("resumed losses = uninterrupted losses", False, f"{len(resumed)} vs {len(bf16)} logged steps")
        check("bf16-resume resumed", "resumed from" in (tmp / "bf16-resume.log").read_text())
        for name in ("big-bf16", "big-bf16-grouped"):
            tps = by[name]["tokens_per_s"][a.warmup:]
            by[name]["steady_tokens_per_s"] = statistics.median(tps) if tps else None
            # model FLOPs per token: 6N (policy forward + backward) + 2N (reference forward), attention ignored
            by[name]["model_tflops"] = 8 * n_big * (by[name]["steady_tokens_per_s"] or 0) / 1e12
        flat, grouped = by["big-bf16"], by["big-bf16-grouped"]
        if flat["steady_tokens_per_s"] and grouped["steady_tokens_per_s"]:
            results["grouped_over_flat_tokens_per_s"] = grouped["steady_tokens_per_s"] / flat["steady_tokens_per_s"]
            print(f"[gpu-check] 8B-shaped, {a.layers} layers ({n_big / 1e9:.2f}B): tokens/s {flat['steady_tokens_per_s']:.0f} "
                  f"({flat['model_tflops']:.0f} model TFLOP/s, peak {flat['peak_gpu_mib']} MiB); length-grouped "
                  f"{grouped['steady_tokens_per_s']:.0f} (ratio {results['grouped_over_flat_tokens_per_s']:.2f})", flush=True)

        export = tmp / "bf16" / "model"
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(export)
        check("bf16 export loads", m.dtype == torch.bfloat16, f"dtype {m.dtype}")
        del m
        gen = [f"run_dir={tmp / 'bf16'}", f"policy_model={tmp / 'small-model'}", f"ref_model={tmp / 'small-model'}", *data[:3], "HH_test.num_sample=8",
               "HH_test.max_new_tokens=32"]
        backends = ["transformers"] + (["vllm"] if cuda and importlib.util.find_spec("vllm") else [])
        if "vllm" not in backends:  # (vLLM's CPU attention has no kernel for the tiny model's head size)
            print(f"[gpu-check] vllm generation not run: {'not installed here' if cuda else 'CPU variant'}", flush=True)
        for backend in backends:
            rc, out, wall = hhdpo("generate", "--config", CONFIG, "--backend", backend, *gen,
                                  f"HH_test.HH_test_policy_out=eval/policy_{backend}.jsonl",
                                  f"HH_test.HH_test_base_out=eval/base_{backend}.jsonl", log=tmp / f"generate-{backend}.log")
            outs = tmp / "bf16" / "eval" / f"policy_{backend}.jsonl"
            rows = outs.read_text().splitlines() if outs.is_file() else []
            check(f"generate --backend {backend}", rc == 0 and len(rows) == 8, f"rc={rc}, {len(rows)} rows, {wall:.0f} s")
            if rc:
                print(out[-3000:], flush=True)
            results[f"generate_{backend}_s"] = round(wall, 1)
    finally:
        results["checks"] = checks
        if a.out:
            a.out.write_text(json.dumps(results, indent=1))
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [c["check"] for c in checks if not c["ok"]]
    print(f"[gpu-check] {len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
