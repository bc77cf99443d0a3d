"""DPO training throughput: hhdpo (FSDP2) vs TRL's DPOTrainer, same machine, model and pairs.

Every configuration runs in a fresh subprocess (so peak RSS from getrusage is its own) with
the same thread count, on the first --pairs HH pairs of --data as hhdpo parses and tokenizes
them, in the same micro-batches of --batch-size pairs, in the same order:

  hhdpo-fp32 / hhdpo-bf16           live reference model; one process, so in fp32 the trainer runs
                                    the models unwrapped (no FSDP2); bf16 = FSDP2's mixed precision
                                    on one rank over fp32 master weights, the frozen reference in bf16;
                                    padded rows (dpo_training.padding_free=false, length groups by default)
  hhdpo-fp32-pre / hhdpo-bf16-pre   dpo_training.precompute_ref_log_probs=true, cold cache
                                    (HHDPO_CACHE is a fresh temp dir); the one-off precompute is
                                    timed separately and excluded from tokens/s
  hhdpo-*-pf                        the four above with dpo_training.padding_free=true (one packed
                                    row per micro-batch), share_prompt=false
  hhdpo-*-sp                        the four above with padding_free=true and share_prompt=true (each
                                    pair's prompt forwarded once); the hhdpo/TRL ratios take the
                                    fastest of each padded / padding-free / shared-prompt trio
  trl-fp32 / trl-bf16               trl.DPOTrainer, DPOConfig(bf16=..., use_cpu=True)
  trl-fp32-pre / trl-bf16-pre       the same with precompute_ref_log_probs=True

TRL is given hhdpo's token ids (prompt_ids / chosen_ids / rejected_ids, already truncated to
max_len / max_prompt_len), so both train on identical token sequences: TRL 1.16 has no
max_prompt_length (its collator cuts prompt+completion at max_length from the right, i.e. it
drops response tokens where hhdpo drops old prompt turns), and its own chat-template
tokenization keeps the template's newline after <|im_end|> that hhdpo trims; the TRL child
reports how many pairs its own conversational tokenization would render identically.

tokens = non-pad tokens (attention_mask sum) of the chosen+rejected rows, the prompt counted in
both, however they are forwarded (a shared-prompt row forwards the prompt once and still counts
it twice: the same pairs, the same tokens/s scale): hhdpo's train_step stats['tokens']; for TRL a wrapper around its data collator. The first
--warmup steps are excluded; the timed window runs from the end of the last warm-up step to
the end of the last step (data collation, forward/backward, clipping, optimizer included).
Model FLOPs = 6*N*tokens (policy fwd+bwd) + 2*N*tokens (live reference forward), N = all
parameters (the tied embedding counted once, as the LM head), attention FLOPs ignored; shown
as a fraction of the measured 2048^3 matmul rate (fp32 for fp32 runs, bf16 for bf16 runs).
On a CPU without native bf16 (no AVX512_BF16/AMX_BF16, e.g. AVX2 only) the bf16 configs and
the bf16 matmul peak are skipped, with the reason printed: bf16 is emulated there and runs
tens of times slower than fp32, so those runs would take hours and measure only the emulation.
This is the usual model-FLOPs convention: work a trainer skips (hhdpo's LM head at prompt and
padding positions, padding between length groups) still counts, so it measures useful tokens
per second against the machine, not the arithmetic actually executed.

Not a test. With 2 OpenMP threads on 2 cores, any other busy process stalls every parallel op
(a 130k-element mul: 29 us alone, ~7 ms with one competing process), so before each run the
script waits (--wait-idle, default up to 300 s) until other processes use < --max-busy cores,
and reports the cores other processes used during each timed window ("others' CPU") next to
the load average; numbers with others' CPU above ~0.1 cores are not comparable.

    python bench/train_throughput.py --out /tmp/tp.json       # all 16 configs, 40 pairs = 10 steps each, ~28 min
    python bench/train_throughput.py --configs hhdpo-fp32,trl-fp32 --pairs 48 --steps 14
    python bench/train_throughput.py --configs hhdpo-fp32,trl-fp32 --profile 3   # torch.profiler tables
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

from _throughput_children import (
    child_hhdpo,
    child_matmul,
    child_trl,
    cpu_snapshot,
    others_cores,
)

REPO = Path(__file__).resolve().parents[1]
# name: (framework, precision, precompute, batching); batching: padded, pf (padding-free), sp (padding-free,
# each prompt once); e.g. hhdpo-fp32, hhdpo-bf16-pre-pf, hhdpo-fp32-sp, trl-fp32-pre
CONFIGS = {f"{fw}-{prec}{'-pre' if pre else ''}{'' if mode == 'padded' else '-' + mode}": (fw, prec, pre, mode)
           for fw, mode in (("hhdpo", "padded"), ("hhdpo", "pf"), ("hhdpo", "sp"), ("trl", "padded"))
           for pre in (False, True) for prec in ("fp32", "bf16")}
RESULT_TAG = "BENCH_RESULT "


# ---------------------------------------------------------------------------- helpers


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def wait_for_idle(max_cores: float, max_wait: float) -> dict:
    """Wait (up to max_wait s) until the rest of the machine uses < max_cores cores over a 3 s sample."""
    t0 = time.perf_counter()
    while True:
        s0 = cpu_snapshot()
        time.sleep(3)
        busy = others_cores(s0, cpu_snapshot())
        waited = time.perf_counter() - t0
        if busy < max_cores or waited >= max_wait:
            return {"waited_s": waited, "others_cores_at_start": busy, "idle": busy < max_cores}
        time.sleep(5)


# ---------------------------------------------------------------------------- parent


def count_params(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total  # a tied lm_head is not stored, so it is counted once


def raw_rows_for(data: str, pairs: int) -> int:
    """How many raw records hold the first `pairs` pairs hhdpo parses (some records are skipped)."""
    from hhdpo.data.hh import load_raw, split_pair

    got = 0
    for i, (_, rec) in enumerate(load_raw(data, "test")):
        if not isinstance(split_pair(rec["chosen"], rec["rejected"]), str):
            got += 1
            if got == pairs:
                return i + 1
    raise SystemExit(f"{data}: only {got} usable pairs, --pairs {pairs} requested")


def run_child(a, name: str, cache_root: Path, model_dir: str) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(a.threads)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TQDM_DISABLE="1", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", DATASETS_VERBOSITY="error")
    # cold per-run hhdpo cache (so precompute_ref_log_probs computes), sharing only the converted model
    cache = cache_root / name
    (cache / "models").mkdir(parents=True, exist_ok=True)
    (cache / "models" / "smollm2").symlink_to(model_dir)
    env["HHDPO_CACHE"] = str(cache)
    env["HF_DATASETS_CACHE"] = str(cache / "datasets")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name] + a.child_argv
    idle = wait_for_idle(a.max_busy, a.wait_idle)
    la0 = loadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=a.timeout, check=False)
    wall = time.perf_counter() - t0
    if a.verbose:
        sys.stderr.write(p.stderr)
    res = None
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
    if p.returncode != 0 or res is None:
        tail = "\n".join((p.stdout + "\n" + p.stderr).strip().splitlines()[-40:])
        raise SystemExit(f"{name}: child failed (exit {p.returncode}):\n{tail}")
    res.update(name=name, wall_s=wall, loadavg_before=la0, loadavg_after=loadavg(), **idle)
    return res


def main(argv: list[str] | None = None) -> int:
    default_data = os.environ.get("HH_DATA") or str(REPO.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data, help="HH jsonl(.gz) (default: $HH_DATA or <repo>/../shared/...)")
    ap.add_argument("--pairs", type=int, default=40, help="first N pairs hhdpo parses from --data (default 40)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (both trainers)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per config, warm-up included "
                                                            "(default: pairs / batch-size; cycles over the pairs)")
    ap.add_argument("--warmup", type=int, default=2, help="leading steps excluded from the timing")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-prompt-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch/OMP threads in every child")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--matmul-reps", type=int, default=10)
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="instead of timing, profile K steps after warm-up with torch.profiler and print op tables")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per child")
    ap.add_argument("--max-busy", type=float, default=0.3, metavar="CORES",
                    help="before each run, wait until other processes use fewer cores than this (default 0.3)")
    ap.add_argument("--wait-idle", type=float, default=300, metavar="S",
                    help="give up waiting for an idle machine after S seconds and run anyway (default 300)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--verbose", action="store_true", help="show the children's stderr")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--raw-rows", dest="raw_rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--skip-bf16", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.steps = a.steps or a.pairs // a.batch_size
    if a.pairs < a.batch_size or a.steps <= a.warmup:
        ap.error("need --pairs >= --batch-size and --steps > --warmup")

    if a.child:
        if a.child == "matmul":
            res = child_matmul(a)
        else:
            fw, precision, precompute, batching = CONFIGS[a.child]
            res = child_hhdpo(a, precision, precompute, batching) if fw == "hhdpo" else child_trl(a, precision, precompute)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s) {bad}; choose from {', '.join(CONFIGS)}")
    sys.path.insert(0, str(REPO))
    from hhdpo.core.models import resolve_model
    from hhdpo.training.precision import bf16_matmul_slowdown, cpu_bf16_native

    native, why = cpu_bf16_native()
    a.skip_bf16 = not native
    if a.skip_bf16:
        skipped = [n for n in names if CONFIGS[n][1] == "bf16"]
        names = [n for n in names if CONFIGS[n][1] != "bf16"]
        print(f"# skipping bf16 ({', '.join(skipped) or 'no configs'} and the bf16 matmul peak): no native bf16 on this CPU "
              f"({why}); a 256^2 bf16 matmul takes {bf16_matmul_slowdown():.0f}x the fp32 time here", flush=True)
        if not names:
            return 0

    model_dir = resolve_model("smollm2")
    n_params = count_params(model_dir)
    a.raw_rows = raw_rows_for(a.data, a.pairs)
    a.child_argv = ["--data", a.data, "--pairs", str(a.pairs), "--batch-size", str(a.batch_size), "--steps", str(a.steps),
                    "--warmup", str(a.warmup), "--max-len", str(a.max_len), "--max-prompt-len", str(a.max_prompt_len),
                    "--threads", str(a.threads), "--matmul-reps", str(a.matmul_reps), "--profile", str(a.profile),
                    "--raw-rows", str(a.raw_rows)] + (["--skip-bf16"] if a.skip_bf16 else [])
    print(f"# DPO train throughput: SmolLM2-135M ({n_params / 1e6:.1f}M params), first {a.pairs} HH pairs of {a.data} "
          f"({a.raw_rows} records), batch {a.batch_size} pairs, max_len {a.max_len}/prompt {a.max_prompt_len}, "
          f"{a.steps} steps ({a.warmup} warm-up), {a.threads} threads, {os.cpu_count()} cores", flush=True)
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in loadavg())}", flush=True)

    cache_root = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    results = {"meta": {"pairs": a.pairs, "raw_rows": a.raw_rows, "batch_size": a.batch_size, "steps": a.steps,
                        "warmup": a.warmup, "max_len": a.max_len, "max_prompt_len": a.max_prompt_len,
                        "threads": a.threads, "n_params": n_params, "data": a.data, "loadavg_start": loadavg()},
               "runs": {}}
    try:
        if not a.profile:
            peak = _run_matmul(a)
            results["matmul_flops"] = peak
            bf16 = f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s " if "bf16" in peak else ""
            print(f"# matmul 2048^3 ({a.threads} threads, best of {a.matmul_reps}): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
                  f"{bf16}(others' CPU {peak['others_cores']:.2f} cores)", flush=True)
        for name in names:
            r = run_child(a, name, cache_root, model_dir)
            results["runs"][name] = r
            if a.profile:
                print(f"\n## {name}: torch.profiler, {a.profile} steps after {a.warmup} warm-up, by self CPU time\n")
                print(r.get("profile", "(no profile)"), flush=True)
                continue
            _derive(r, CONFIGS[name], n_params, results["matmul_flops"])
            pre = f", precompute {r['precompute_s']:.1f} s" if "precompute_s" in r else ""
            print(f"# {name}: {r['tok_s']:.0f} tokens/s, {r['timed_s']:.1f} s for {r['timed_tokens']} tokens "
                  f"({r['torch_threads']} torch threads), "
                  f"init {r['init_s']:.1f} s{pre}, peak RSS {r['peak_rss_gb']:.2f} GB, "
                  f"others' CPU while timed {r['others_cores']:.2f} cores (waited {r['waited_s']:.0f} s for idle), "
                  f"loadavg {r['loadavg_before'][0]:.2f}->{r['loadavg_after'][0]:.2f}", flush=True)
    finally:
        import shutil

        shutil.rmtree(cache_root, ignore_errors=True)
    results["meta"]["loadavg_end"] = loadavg()
    if not a.profile:
        report(results, names)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {a.out}")
    return 0


def _run_matmul(a) -> dict:
    wait_for_idle(a.max_busy, a.wait_idle)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "matmul"] + a.child_argv
    p = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600, check=False)
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise SystemExit(f"matmul child failed:\n{p.stderr[-3000:]}")


def _derive(r: dict, spec: tuple, n_params: int, peak: dict) -> None:
    fw, precision, precompute, _ = spec
    r["framework"], r["precision"], r["precompute"] = fw, precision, precompute
    r["tok_s"] = r["timed_tokens"] / r["timed_s"]
    r["pairs_s"] = r["timed_pairs"] / r["timed_s"]
    per_token = (6 if precompute else 8) * n_params
    r["model_flops_s"] = per_token * r["tok_s"]
    r["peak_fraction"] = r["model_flops_s"] / peak[precision]


def report(results: dict, names: list[str]) -> None:
    runs = results["runs"]
    print("\n| config | tokens/s | pairs/s | peak RSS GB | model FLOP/s | % of matmul peak | one-off precompute s | others' CPU (cores) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        r = runs[n]
        pre = f"{r['precompute_s']:.1f}" if "precompute_s" in r else "-"
        print(f"| {n} | {r['tok_s']:.0f} | {r['pairs_s']:.2f} | {r['peak_rss_gb']:.2f} | {r['model_flops_s'] / 1e9:.1f} G | "
              f"{100 * r['peak_fraction']:.1f}% ({r['precision']}) | {pre} | {r['others_cores']:.2f} |")
    steps = {n: tuple(runs[n]["tokens_per_step"]) for n in names}
    same = len(set(steps.values())) == 1
    print(f"\nsame tokens in every step across configs: {'yes' if same else 'NO: ' + json.dumps({n: list(v) for n, v in steps.items()})}"
          f" ({sum(next(iter(steps.values())))} tokens in {len(next(iter(steps.values())))} steps)")
    first = {n: runs[n]["logps_chosen_mean"][0] for n in names if runs[n].get("logps_chosen_mean")}
    if first:
        print("step-1 mean policy log p(chosen): " + ", ".join(f"{n} {v:.3f}" for n, v in first.items()))
    for n in names:
        if "trl_own_tokenization" in runs[n]:
            t = runs[n]["trl_own_tokenization"]
            print(f"TRL's own conversational tokenization vs hhdpo's (untruncated): prompt identical in {t['same_prompt']}/{t['pairs']}, "
                  f"prompt+chosen+rejected identical in {t['same_all']}/{t['pairs']}; e.g. chosen ends "
                  f"{t['first_diff']['hhdpo_chosen_tail']!r} (hhdpo) vs {t['first_diff']['trl_chosen_tail']!r} (TRL)"
                  if t["first_diff"] else "")
            print(f"pairs longer than max_len {results['meta']['max_len']}: {t['over_max_len']}/{t['pairs']} (TRL's keep_start would cut "
                  f"their responses, and drop the {t['prompt_over_max_len']} whose prompt alone is >= max_len; hhdpo drops "
                  f"the oldest prompt tokens instead, keeping >= max_prompt_len of them)")
            break

    def ratio(x, y, label, target=None):
        if x in runs and y in runs:
            v = runs[x]["tok_s"] / runs[y]["tok_s"]
            tgt = f" (target >= {target}x: {'met' if v >= target else 'NOT met'})" if target else ""
            print(f"RATIO {x} / {y} = {v:.2f}x{tgt}  [{label}]")
            results.setdefault("ratios", {})[f"{x}/{y}"] = v

    def best(name):  # hhdpo's fastest batching: padded (length-grouped), padding-free or shared prompt
        return max((n for n in (name, name + "-pf", name + "-sp") if n in runs), key=lambda n: runs[n]["tok_s"], default=name)

    print()
    for p in ("fp32", "bf16"):
        for pre in ("", "-pre"):
            ratio(f"hhdpo-{p}{pre}-pf", f"hhdpo-{p}{pre}", "hhdpo padding-free vs padded")
            ratio(f"hhdpo-{p}{pre}-sp", f"hhdpo-{p}{pre}-pf", "hhdpo shared prompt vs padding-free")
    for p in ("fp32", "bf16"):
        ratio(best(f"hhdpo-{p}"), f"trl-{p}", "equal precision, hhdpo's fastest batching", 3.0)
        ratio(best(f"hhdpo-{p}-pre"), f"trl-{p}", "hhdpo precomputed vs TRL live", 2.0)
        ratio(best(f"hhdpo-{p}-pre"), f"trl-{p}-pre", "both precomputed")
    ratio("hhdpo-bf16", "hhdpo-fp32", "hhdpo bf16 vs fp32")
    ratio("trl-bf16", "trl-fp32", "TRL bf16 vs fp32")
    m = results["meta"]
    print(f"load average: start {' '.join(f'{x:.2f}' for x in m['loadavg_start'])}, "
          f"end {' '.join(f'{x:.2f}' for x in m['loadavg_end'])}")


if __name__ == "__main__":
    sys.exit(main())
