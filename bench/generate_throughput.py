"""Throughput of `hhdpo generate`'s backends: vLLM vs transformers on the same prompts.

Both engines are the ones the stage uses (hhdpo.evaluation.generate.VLLMEngine / HFEngine), fed the
same chat-template token ids and sampling settings; model loading is timed separately and
excluded from tokens/s. Not a test: run it by hand on an otherwise idle machine.

    python bench/generate_throughput.py                       # SmolLM2, 64 prompts x 128 tokens
    python bench/generate_throughput.py --greedy --num-prompts 32 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def run(backend: str, cfg, path: str, tok, prompts: list[list[int]], chunk: int) -> dict:
    """Load, generate all prompts in chunks, close; returns timings and token counts."""
    from hhdpo.evaluation.generate import open_engine

    t0 = time.perf_counter()
    engine = open_engine(backend, cfg, path, tok)
    load = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        tokens = 0
        for start in range(0, len(prompts), chunk):
            idxs = list(range(start, min(start + chunk, len(prompts))))
            tokens += sum(len(ids) for ids, _ in engine.generate([prompts[i] for i in idxs], idxs))
        secs = time.perf_counter() - t0
    finally:
        engine.close()
    return {"backend": backend, "load_s": load, "tokens": tokens, "secs": secs, "tok_s": tokens / secs}


def main(argv: list[str] | None = None) -> int:
    default_data = os.environ.get("HH_DATA") or str(Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model spec (alias, dir or Hub id)")
    ap.add_argument("--data", default=default_data, help="HH test jsonl(.gz) (default: $HH_DATA or ../shared/...)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--greedy", action="store_true", help="greedy instead of temperature 0.7 / top_p 0.9")
    ap.add_argument("--batch-size", type=int, default=16, help="transformers batch size (HH_test.batch_size)")
    ap.add_argument("--chunk-size", type=int, default=64, help="vLLM prompts per generate call (vllm.chunk_size)")
    ap.add_argument("--backends", default="vllm,transformers", help="comma-separated, run in this order")
    ap.add_argument("--hf-threads", type=int, default=None,
                    help="torch threads for transformers (default: torch's); 1 avoids OpenMP spin-wait "
                         "collapse when other jobs share the cores")
    args = ap.parse_args(argv)

    from hhdpo.core.config import load_config
    from hhdpo.core.models import load_tokenizer, resolve_model
    from hhdpo.evaluation.generate import load_prompts, render_prompt

    cfg = load_config(None, [
        f"HH_test.hh_test={args.data}", f"HH_test.num_sample={args.num_prompts}",
        f"HH_test.max_new_tokens={args.max_new_tokens}", f"HH_test.max_prompt_length={args.max_prompt_length}",
        f"HH_test.do_sample={'false' if args.greedy else 'true'}", "HH_test.temperature=0.7", "HH_test.top_p=0.9",
        f"HH_test.batch_size={args.batch_size}", f"vllm.chunk_size={args.chunk_size}",
    ])
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    prompts = [render_prompt(p, tok, args.max_prompt_length) for p in load_prompts(cfg, log=None)]
    print(f"{len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, max_new_tokens={args.max_new_tokens}, "
          f"{'greedy' if args.greedy else 'temperature=0.7 top_p=0.9'}, model={args.model}, cores={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for backend in args.backends.split(","):
        chunk = args.chunk_size if backend == "vllm" else args.batch_size
        if backend == "transformers" and args.hf_threads:
            import torch

            torch.set_num_threads(args.hf_threads)
        r = results[backend] = run(backend, cfg, path, tok, prompts, chunk)
        print(f"RESULT {backend:<12} load {r['load_s']:6.1f} s  {r['tokens']:6d} new tokens in {r['secs']:7.1f} s  "
              f"= {r['tok_s']:7.1f} new tokens/s", flush=True)
    if {"vllm", "transformers"} <= results.keys():
        ratio = results["vllm"]["tok_s"] / results["transformers"]["tok_s"]
        print(f"RESULT vllm / transformers = {ratio:.2f}x (target >= 3x); load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
