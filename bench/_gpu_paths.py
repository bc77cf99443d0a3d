"""``gpu_check.py --checks``: the GPU code paths through ``hhdpo train`` and ``hhdpo generate`` as users run them.

A random SmolLM2-135M-shaped Llama (--device cpu: the tiny one) trained on the real HH file, one
process (nccl on a GPU):

  fp32          the model unwrapped (nothing to shard)
  bf16          FSDP2's mixed precision on a 1-rank mesh (bf16 compute over fp32 master weights,
                fp32 gradient reduce), built on the meta device with the bf16 safetensors streamed
                into the shards: a multi-GPU run's code path
  bf16-resume   bf16 stopped at half its steps (a DCP checkpoint), then resumed

then ``hhdpo generate --backend transformers`` samples from bf16's Hugging Face export. Checks:
every run exits 0 and logs the expected world, device, backend, dtype and fsdp; bf16's first loss
is exactly ln 2 and its first log-probs match fp32's (bf16 tolerance); bf16-resume continues with
bf16's losses; the export loads in bf16; generation writes every prompt.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _gpu_rows import REPO, make_llama

CONFIG = "configs/smollm2_cpu.yaml"


def hhdpo(*args, log: Path) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "hhdpo", *map(str, args)], check=False, cwd=REPO, capture_output=True, text=True)
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def _train(name: str, tmp: Path, model: Path, common: list[str], extra: list[str]) -> dict:
    run_dir = tmp / name
    rc, out, wall = hhdpo("train", "--config", CONFIG, "--nproc-per-node", 1, f"policy_model={model}",
                          f"ref_model={model}", f"run_dir={run_dir}", *common, *extra, log=tmp / f"{name}.log")
    metrics = run_dir / "model" / "metrics.jsonl"
    recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    head = next((x for x in out.splitlines() if x.startswith("[train] attempt=")), "")
    print(f"[gpu-check] {name}: rc={rc} {wall:.0f} s | {head}", flush=True)
    if rc:
        print(out[-4000:], flush=True)
    return {"name": name, "rc": rc, "wall_s": round(wall, 1), "log": head, "losses": [x["loss"] for x in recs if "loss" in x],
            "logps": [x["logps/chosen"] for x in recs if "loss" in x]}


def run_checks(a, tmp: Path, tok_dir: Path, check) -> dict:
    """The runs above; ``check(name, ok, detail)`` records each check. Returns the runs' results."""
    import torch

    cuda = a.device == "cuda"
    model = tmp / "paths-model"
    make_llama(model, tok_dir, "smollm2" if cuda else "tiny", 30 if cuda else 2)
    data = [f"dataset.dataset_name={a.data}", f"HH_test.hh_test={a.data}", f"device={a.device}", "wandb.mode=disabled",
            "dpo_training.lr_scheduler=constant", "dpo_training.warmup_steps=2", "dpo_training.log_steps=1",
            "dpo_training.learning_rate=1e-5"]
    common = [*data, "dataset.subset=train[:640]", "dataset.val_ratio=0.05", "dataset.max_len=256",
              "dataset.max_prompt_len=128", "dpo_training.batch_size=8", "checkpoint.save_steps=0"]
    steps, half = a.check_steps, a.check_steps // 2
    runs = [_train(name, tmp, model, common, extra) for name, extra in (
        ("fp32", ["precision=fp32", f"dpo_training.max_steps={steps}"]),
        ("bf16", ["precision=bf16", f"dpo_training.max_steps={steps}"]),
        ("bf16-resume", ["precision=bf16", f"dpo_training.max_steps={half}", f"checkpoint.save_steps={half}"]),
        # the same run directory, now to the end: resumes from the checkpoint at `half`
        ("bf16-resume", ["precision=bf16", f"dpo_training.max_steps={steps}"]))]
    by = {r["name"]: r for r in runs}  # the second bf16-resume (the resumed one) wins
    for r in runs:
        bf16 = "bf16" in r["name"]
        want = (f"world=1 device={a.device}{':0' if cuda else ''} backend={'nccl' if cuda else 'gloo'} "
                f"dtype=torch.{'bfloat16' if bf16 else 'float32'} fsdp={'yes' if bf16 else 'no'}")
        check(f"{r['name']} ran", r["rc"] == 0 and want in r["log"], f"rc={r['rc']} want '{want}' in '{r['log']}'")
    bf16, resumed = by["bf16"]["losses"], by["bf16-resume"]["losses"]
    if by["fp32"]["logps"] and bf16:
        # policy = reference at step 1: the loss is ln 2 exactly when both compute alike
        check("bf16 step-1 loss = ln 2", abs(bf16[0] - math.log(2)) < 1e-6 * math.log(2), f"{bf16[0]:.7f}")
        x, y = by["bf16"]["logps"][0], by["fp32"]["logps"][0]
        check("bf16 step-1 log-probs = fp32's", abs(x - y) / abs(y) < 2e-2, f"{x:.4f} vs {y:.4f}")
    worst = max((abs(x - y) / max(abs(y), 1e-6) for x, y in zip(resumed, bf16)), default=math.inf)
    check("resumed losses = uninterrupted losses", len(resumed) == len(bf16) and worst < (1e-2 if cuda else 1e-5),
          f"worst rel diff {worst:.1e}, {len(resumed)} vs {len(bf16)} logged steps")
    check("bf16-resume resumed", "resumed from" in (tmp / "bf16-resume.log").read_text())
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp / "bf16" / "model")
    check("bf16 export loads", m.dtype == torch.bfloat16, f"dtype {m.dtype}")
    del m
    rc, out, wall = hhdpo("generate", "--config", CONFIG, "--backend", "transformers", f"run_dir={tmp / 'bf16'}",
                          f"policy_model={model}", f"ref_model={model}", *data[:3], "HH_test.num_sample=8",
                          "HH_test.max_new_tokens=32", log=tmp / "generate-transformers.log")
    outs = tmp / "bf16" / "eval" / "policy_out.jsonl"
    rows = outs.read_text().splitlines() if outs.is_file() else []
    check("generate --backend transformers", rc == 0 and len(rows) == 8, f"rc={rc}, {len(rows)} rows, {wall:.0f} s")
    if rc:
        print(out[-3000:], flush=True)
    return {"runs": runs, "generate_transformers_s": round(wall, 1)}
