"""Training throughput and MFU at the seed's scale on one CUDA device, through hhdpo's own trainer (not a test).

A random-weight Llama with Llama-3.1-8B's layers (4096 hidden, 14336 MLP, 32 heads, 8 KV heads)
and its untied 128,256-token LM head, as many layers as one GPU holds with the policy (fp32
master weights, fp32 gradients, two AdamW states: 16 B/param) and the live bf16 reference
(2 B/param) (``_gpu_rows.layers_that_fit``: 23 on an H200, 10 on an H100 80GB), SmolLM2's
tokenizer (its ids fit the larger vocabulary), the real HH file, the seed's settings
(configs/llama31_8b.yaml: max_len 512, prompt 256, 2 pairs x 2 micro-batches per step, bf16,
activation checkpointing --ac) on one FSDP2 rank. Each row is one process
(``_gpu_rows.child_row``) with a timeout, so an OOM or a failure loses that row alone:

  padded        the micro-batch's rows padded to the longest (dpo_training.padding_free=false)
  padfree       one packed row per micro-batch (dpo_training.padding_free=true, share_prompt=false)
  shared        padfree with each pair's prompt once (dpo_training.share_prompt=true; hhdpo's per-pair
                SDPA, the sdpa model's path); its tokens/s counts the prompt twice, as every row does,
                so its MFU is useful work per second (it computes ~1/1.6 of those FLOPs at the seed's lengths)
  compiled      padfree with dpo_training.compile=true (torch.compile per decoder layer)
  *-pre         the same with the reference log-probs precomputed (its one-off pass not timed)
  compiled-padded  padded with compile (only when --rows names it)

Rows whose config key this checkout lacks are skipped, said so (padfree rows without padding_free;
compiled then runs padded); --token-budget sets dpo_training.max_tokens_per_micro_batch where it exists.

tokens/s: real (unpadded) tokens per second of the median step after --warmup steps, from the
trainer's metrics.jsonl (one process, so per GPU). peak GB: torch.cuda.max_memory_allocated
over the steps (the set-up and the precompute excluded; on CPU: peak RSS). MFU = tokens/s x
FLOPs per token / the device's dense bf16 peak (989 TFLOP/s for an H100 SXM or H200; table in
_gpu_rows.PEAK_BF16). FLOPs per token: 8N with the live reference (policy forward + backward 6N,
reference forward 2N), 6N with it precomputed; N = every parameter a token's matmuls use: all
but the input embedding (a lookup), the 128k LM head included at every token, though hhdpo
projects only response positions; attention's score and value products (~1% more at 512
tokens) and the recomputation of checkpointed layers are not counted: MFU, not hardware FLOPs.

Checks: every row ran all its steps; the first step's loss is ln 2 (policy = reference; eager
live rows to 1e-6, compiled or precomputed to 1e-2); padfree's and compiled's first log-probs
match padded's (bf16 tolerance). Where vLLM is importable (GPU):
``hhdpo generate --backend vllm`` vs vLLM's own ``LLM.generate`` on the same prompts, a
SmolLM2-shaped random model, eager engines (short start-up). --checks adds the code-path runs of
_gpu_paths.py (fp32, bf16 = ln 2, DCP resume, export, generate; ~4 min on a GPU). The whole run
stops starting rows at --budget seconds (default 450 on a GPU: ~8 minutes on one H200).
Exits 1 if a check fails.

    make bench-gpu                               # = python bench/gpu_check.py [--out gpu.json]
    python bench/gpu_check.py --layers 8 --rows padded,compiled --out gpu.json   # also writes gpu.md
    python bench/gpu_check.py --device cpu --layers 1 --max-len 128 --steps 3 --warmup 1   # tiny, CPU smoke (~3 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _gpu_rows import (
    REPO,
    RESULT,
    SEED_CONFIG,
    layers_that_fit,
    ln2_gap,
    make_llama,
    mfu,
    peak_flops,
)

HH_DATA = os.environ.get("HH_DATA") or str(REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz")
ROWS = {  # name: (padding-free: False, True or "shared" (each prompt once), compiled, precomputed reference)
    "padded": (False, False, False), "padfree": (True, False, False), "shared": ("shared", False, False),
    "compiled": (True, True, False),
    "padded-pre": (False, False, True), "padfree-pre": (True, False, True), "compiled-pre": (True, True, True),
    "compiled-padded": (False, True, False),  # not run by default: compile without packing (--rows)
}
RUN_ORDER = ("padded", "padfree", "shared", "compiled", "compiled-pre", "padfree-pre", "padded-pre")  # compiled-pre: warm caches


def child(kind: str, spec: dict, tmp: Path, timeout: float, env: dict | None = None) -> dict:
    """Run ``_gpu_rows.py KIND`` in its own process; its RESULT line, or rc and the output's tail."""
    path = tmp / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), TQDM_DISABLE="1",
             TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).with_name("_gpu_rows.py")), kind, str(path)],
                           cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout, check=False)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as x:
        out, rc = (x.stdout or b"").decode(errors="replace") + (x.stderr or b"").decode(errors="replace"), "timeout"
    (tmp / f"{spec['name']}.log").write_text(out)
    res = next((json.loads(x[len(RESULT):]) for x in out.splitlines() if x.startswith(RESULT)), None)
    wall = round(time.perf_counter() - t0, 1)
    if res is None:
        oom = "OutOfMemoryError" in out or "CUDA out of memory" in out
        return {"status": "OOM" if oom else f"failed (rc {rc})", "wall_s": wall, "tail": out[-3000:]}
    return {"status": "ok", "wall_s": wall, **res}


def row_overrides(a, name: str, model: Path, tmp: Path, keys: set[str]) -> tuple[list[str], str | None]:
    """The row's config overrides, or (why it cannot run in this checkout)."""
    padfree, compiled, pre = ROWS[name]
    o = [f"policy_model={model}", f"ref_model={model}", f"run_dir={tmp / name}", f"dataset.dataset_name={a.data}",
         f"dataset.subset=train[:{a.raw_rows}]", "dataset.data_dirs=[]", "dataset.val_ratio=0",
         f"device={a.device}", f"precision={'bf16' if a.device == 'cuda' else 'fp32'}", "dpo_training.fsdp=true",
         f"dpo_training.max_steps={a.steps}", "dpo_training.log_steps=1", "dpo_training.eval_steps=0",
         "dpo_training.lr_scheduler=constant", "dpo_training.warmup_steps=0", "checkpoint.save_steps=0",
         "wandb.mode=disabled", f"dpo_training.precompute_ref_log_probs={str(pre).lower()}",
         f"dpo_training.activation_checkpointing={str(a.ac != 'off').lower()}"]
    o += [f"dataset.max_len={a.max_len}", f"dataset.max_prompt_len={a.max_len // 2}"] if a.max_len else []
    o += [f"dpo_training.{k}={v}" for k, v in (("batch_size", a.batch_size), ("gradient_accumulation_steps", a.grad_accum)) if v]
    if a.ac != "off":
        o.append(f"dpo_training.ac_mode={a.ac}")
    if "padding_free" in keys:
        o.append(f"dpo_training.padding_free={str(bool(padfree)).lower()}")  # explicit: its null may pick either
    elif padfree and not compiled:
        return [], "no dpo_training.padding_free in this checkout"
    if "share_prompt" in keys:
        o.append(f"dpo_training.share_prompt={str(padfree == 'shared').lower()}")  # explicit: null is on with padding-free
    elif padfree == "shared":
        return [], "no dpo_training.share_prompt in this checkout"
    if compiled:
        if "compile" not in keys:
            return [], "no dpo_training.compile in this checkout"
        o.append("dpo_training.compile=true")
    if a.token_budget:
        if "max_tokens_per_micro_batch" not in keys:
            return [], "no dpo_training.max_tokens_per_micro_batch in this checkout"
        o.append(f"dpo_training.max_tokens_per_micro_batch={a.token_budget}")
    return o, None


def generation(a, tmp: Path, tok_dir: Path, deadline: float) -> dict:
    """hhdpo generate --backend vllm vs vLLM's own LLM.generate, same prompts and settings."""
    model = tmp / "gen-model"
    make_llama(model, tok_dir, "smollm2", 30)
    hh = [f"HH_test.hh_test={a.data}", f"HH_test.num_sample={a.gen_prompts}", "HH_test.max_new_tokens=128",
          "HH_test.max_prompt_length=512", "HH_test.do_sample=true", "vllm.enforce_eager=true", "vllm.chunk_size=64",
          "vllm.gpu_memory_utilization=0.5", f"device={a.device}", f"precision={'bf16' if a.device == 'cuda' else 'fp32'}"]
    out = {}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "hhdpo", "generate", "--config", SEED_CONFIG, "--backend", "vllm",
                        "--models", f"gen={model}", f"run_dir={tmp / 'gen'}", *hh], cwd=REPO, capture_output=True,
                       text=True, timeout=max(30.0, deadline - time.monotonic()), check=False)
    m = re.search(r"\[generate\] gen: .*?([\d.]+) new tokens/s \((\d+) tokens in ([\d.]+) s, load ([\d.]+) s", p.stdout + p.stderr)
    out["hhdpo"] = ({"tokens_per_s": float(m[1]), "tokens": int(m[2]), "secs": float(m[3]), "load_s": float(m[4])} if m
                    else {"status": f"failed (rc {p.returncode})", "tail": (p.stdout + p.stderr)[-2000:]})
    out["hhdpo"]["wall_s"] = round(time.perf_counter() - t0, 1)
    out["vllm"] = child("vllm", {"name": "vllm-raw", "model": str(model), "overrides": hh}, tmp,
                        max(30.0, deadline - time.monotonic()))
    return out


def _cells(name: str, r: dict) -> list[str]:
    padfree, compiled, pre = ROWS[name]
    tps, u, loss = r.get("tokens_per_s"), r.get("mfu"), (r.get("losses") or [None])[0]
    return [name, "precomputed" if pre else "live", {False: "no", True: "yes"}.get(padfree, padfree), "yes" if compiled else "no",
            f"{tps:.0f}" if tps else "-", f"{100 * u:.1f}%" if u else "-",
            f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-", f"{r['init_s']:.0f}" if "init_s" in r else "-",
            f"{loss:.6f}" if loss is not None else "-", r["status"]]


def report(res: dict, a) -> str:
    """The markdown table of the rows (and of generation, where it ran)."""
    m, env = res["model"], res["env"]
    peak = env.get("peak_flops")
    what = f"{m['layers']} Llama-3.1-8B-shaped layers" if m["shape"] == "llama8b" else f"a tiny Llama, {m['layers']} layer(s)"
    flops = (f"FLOPs/token 8N live, 6N precomputed; MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak
             else "no bf16 peak known for this device: no MFU")
    peak_gb = "max_memory_allocated" if env["device"] == "cuda" else "peak RSS"
    about = (f"N = {m['matmul'] / 1e9:.3f}B matmul parameters ({m['total'] / 1e9:.3f}B in all, vocabulary {m['vocab']}); "
             f"{flops}. max_len {a.max_len or 512}, activation checkpointing {a.ac}, token budget {a.token_budget or 'off'}, "
             f"tokens/s = median step after {a.warmup} of {a.steps}; peak GB = {peak_gb}.")
    lines = [f"## hhdpo DPO training on {env['device_name']}: {what}", "", about,
             "", "| row | reference | padding-free | compiled | tokens/s | MFU | peak GB | set-up s | step-1 loss | status |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(_cells(k, res["rows"][k])) + " |" for k in ROWS if k in res["rows"]]
    gen = res.get("generation")
    if gen:
        lines += ["", f"| generation: SmolLM2-shaped, {a.gen_prompts} prompts x 128 new tokens | new tokens/s | load s | status |",
                  "|---|---:|---:|---|"]
        for k, label in (("hhdpo", "hhdpo generate --backend vllm"), ("vllm", "vLLM LLM.generate")):
            g = gen[k]
            ok = "tokens_per_s" in g
            lines.append(f"| {label} | {g['tokens_per_s']:.0f} | {g['load_s']:.0f} | ok |" if ok else f"| {label} | - | - | {g.get('status')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="smollm2", help="model (alias or directory) whose tokenizer to use (default: smollm2)")
    ap.add_argument("--data", type=Path, default=HH_DATA, help=f"the HH .jsonl.gz file (default: {HH_DATA})")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, help="decoder layers (default: as many as fit on the GPU; 1 on CPU)")
    ap.add_argument("--rows", default=",".join(RUN_ORDER), help=f"comma-separated, run in this order (default: {','.join(RUN_ORDER)})")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per row (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="leading steps left out of tokens/s (compilation, default 3)")
    ap.add_argument("--ac", default="full", choices=["off", "full", "selective"], help="activation checkpointing (seed: full)")
    ap.add_argument("--max-len", type=int, help="dataset.max_len (prompt: half); default: the seed's 512")
    ap.add_argument("--batch-size", type=int, help="pairs per micro-batch (default: the seed's 2)")
    ap.add_argument("--grad-accum", type=int, help="micro-batches per step (default: the seed's 2)")
    ap.add_argument("--token-budget", type=int, default=0, help="dpo_training.max_tokens_per_micro_batch for every row (0: off)")
    ap.add_argument("--row-timeout", type=float, default=300, help="seconds per row (default 300)")
    ap.add_argument("--budget", type=float, help="start no row after this many seconds (default: 450 on a GPU, none on CPU)")
    ap.add_argument("--gen-prompts", type=int, default=64, help="prompts of the generation comparison (where vLLM is)")
    ap.add_argument("--checks", action="store_true", help="also the code-path runs of _gpu_paths.py (fp32, bf16, resume, export)")
    ap.add_argument("--check-steps", type=int, default=12, help="steps of each --checks run (even)")
    ap.add_argument("--out", type=Path, help="write the results as JSON, and the table beside it as .md")
    a = ap.parse_args(argv)
    bad = [r for r in a.rows.split(",") if r.strip() and r.strip() not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {bad}; choose from {', '.join(ROWS)}")
    t_start = time.monotonic()
    deadline = t_start + (a.budget or (450 if a.device == "cuda" else 1e9))

    import torch

    from hhdpo.core.config_schema import DPOTrainingConfig
    from hhdpo.core.models import resolve_model

    cuda = a.device == "cuda"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": a.device, "device_name": "CPU"}
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --device cpu for the tiny CPU variant)")
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, memory_gb=round(props.total_memory / 1e9, 1), peak_flops=peak_flops(props.name))
    print(f"[gpu-check] {env}", flush=True)
    keys = {f.name for f in dataclasses.fields(DPOTrainingConfig)}
    layers = a.layers or (layers_that_fit(props.total_memory) if cuda else 1)
    pairs = a.steps * (a.batch_size or 2) * (a.grad_accum or 2)
    a.raw_rows = pairs + pairs // 4 + 16  # a few HH records are skipped as unusable
    res, checks = {"env": env, "rows": {}}, []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[gpu-check] {'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    tok_dir = Path(resolve_model(a.tokenizer))
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        t0 = time.perf_counter()
        res["model"] = make_llama(tmp / "model", tok_dir, "llama8b" if cuda else "tiny", layers)
        print(f"[gpu-check] random Llama: {layers} layers, {res['model']['total'] / 1e9:.3f}B parameters "
              f"({time.perf_counter() - t0:.0f} s to make)", flush=True)
        n = res["model"]["matmul"]
        for name in [r.strip() for r in a.rows.split(",") if r.strip()]:
            overrides, why = row_overrides(a, name, tmp / "model", tmp, keys)
            left = deadline - time.monotonic()
            if why or left < 90:
                res["rows"][name] = {"status": f"skipped: {why or 'time budget (--budget)'}"}
                print(f"[gpu-check] {name}: {res['rows'][name]['status']}", flush=True)
                continue
            spec = {"name": name, "overrides": overrides, "warmup": a.warmup}
            r = res["rows"][name] = child("row", spec, tmp, min(a.row_timeout, left), {"HHDPO_CACHE": str(tmp / name / "cache")})
            if r["status"] == "failed (rc timeout)" and left < a.row_timeout:
                r["status"] = f"skipped: cut at {left:.0f} s by the time budget (--budget)"
            r["mfu"] = mfu(r.get("tokens_per_s"), (6 if ROWS[name][2] else 8) * n, env.get("peak_flops"))
            print(f"[gpu-check] {name}: {r['status']} in {r['wall_s']:.0f} s" + (
                f", {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_gb']:.1f} GB, step-1 loss {r['losses'][0]:.6f}"
                if r.get("tokens_per_s") else "") + ("\n" + r["tail"] if "tail" in r else ""), flush=True)
        ran = {k: r for k, r in res["rows"].items() if r["status"] == "ok"}
        for k, r in res["rows"].items():
            if not r["status"].startswith("skipped"):
                check(f"{k} ran", k in ran and r.get("rc") == 0 and r["steps"] == a.steps, r["status"])
        for k, r in ran.items():
            # eager live rows: policy and reference run the same kernels on the same weights; a compiled
            # policy (train graph) and reference (no-grad graph), or a precompute's other batches, differ slightly
            tol = 1e-2 if ROWS[k][1] or ROWS[k][2] else 1e-6
            check(f"{k} step-1 loss = ln 2", ln2_gap(r["losses"][0]) < tol, f"{r['losses'][0]:.7f} (tolerance {tol:g})")
        if len(ran) > 1:
            per_step = {k: len(r["losses"]) for k, r in ran.items()}
            check("every row took the same number of steps", len(set(per_step.values())) == 1, str(per_step))
        if "padded" in ran:
            ref = ran["padded"]["logps_chosen"][0]
            for k in ("padfree", "shared", "compiled"):
                if k in ran:
                    x = ran[k]["logps_chosen"][0]
                    check(f"{k} step-1 log-probs = padded's", abs(x - ref) / abs(ref) < (2e-2 if cuda else 1e-4), f"{x:.4f} vs {ref:.4f}")
        if cuda and importlib.util.find_spec("vllm") and deadline - time.monotonic() > 120:
            res["generation"] = generation(a, tmp, tok_dir, deadline)
        else:
            print(f"[gpu-check] generation: not run ({'no vllm importable' if cuda else 'CPU variant'}"
                  f"{'' if not cuda or deadline - time.monotonic() > 120 else ', or no time left'})", flush=True)
        if a.checks:
            from _gpu_paths import run_checks

            res["paths"] = run_checks(a, tmp, tok_dir, check)
    finally:
        res["checks"] = checks
        res["wall_s"] = round(time.monotonic() - t_start, 1)
        table = report(res, a) if "model" in res else ""
        print("\n" + table + "\n", flush=True)
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))
            a.out.with_suffix(".md").write_text(table + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [c["check"] for c in checks if not c["ok"]]
    print(f"[gpu-check] {len(checks) - len(failed)}/{len(checks)} checks passed in {res['wall_s']:.0f} s"
          + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
