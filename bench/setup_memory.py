"""Host memory of setting up the trainer's two models (policy + frozen reference), per rank.

A random Llama of about 500M parameters (bf16 safetensors and an untied LM head, like
Llama-3.1-8B's) is written to a temp dir, so the models' memory dwarfs the libraries'. Each
configuration runs in fresh torchrun workers (gloo, CPU, fp32 compute); every rank records

    added = peak RSS during DPOTrainer._build_model(policy) + _build_model(reference)
            - RSS just before

"Just before" is after the imports, the process group and one whole warm-up setup of a tiny
model of the same family (so first-use library pages and allocator pools are not counted);
the block ends by reading every parameter (weights left memory-mapped would count only then).

peak RSS from VmHWM after resetting it (/proc/self/clear_refs), cross-checked by a thread
sampling VmRSS every 2 ms (the larger is reported). Configurations:

  1 process          world size 1: the models load plainly (from_pretrained), unwrapped
  2 ranks            FSDP2: every rank builds on meta, rank 0 streams each tensor into the shards
  2 ranks, old way   what _build_model did before: every rank loads the full fp32 model, then shards

Prints rank 1's figure / the single process's figure (target <= 0.6), and the estimate for
Llama-3.1-8B-Instruct on 8 GPUs per node from its parameter count. Not a test.

    python bench/setup_memory.py            # ~3-5 min on 2 cores
    python bench/setup_memory.py --layers 4 # a quick smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


# ---------------------------------------------------------------------------- memory probes


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak resident memory over a block, relative to its start (bytes)."""

    def __enter__(self):
        try:  # "5" resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start = _status_kb("VmRSS") * 1024
        self.sampled, self._stop = self.start, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.sampled = max(self.sampled, int(f.read().split()[1]) * page)
                time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        hwm = _status_kb("VmHWM") * 1024 if self.hwm_reset else 0
        self.peak = max(self.sampled, hwm)
        self.added = self.peak - self.start
        self.end = _status_kb("VmRSS") * 1024


# ---------------------------------------------------------------------------- workers


def _old_build(self, spec, trainable):
    """_build_model as it was before meta loading (every rank loads full fp32 copies)."""
    import copy

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from hhdpo.core.models import decoder_layer_classes, load_model

    model = load_model(spec, dtype=torch.float32)
    hf_config, arch = copy.deepcopy(model.config), type(model).__name__
    model.to(self.device)
    mesh = init_device_mesh(self.device.type, (self.world,))
    layer_cls = decoder_layer_classes(model, None)
    for m in model.modules():
        if isinstance(m, layer_cls):
            fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model, hf_config, arch


def _touch(models) -> float:
    import torch

    with torch.no_grad():
        return sum(float((p.to_local() if hasattr(p, "to_local") else p).float().sum()) for m in models for p in m.parameters())


def worker(mode: str, model_dir: str, warmup_dir: str, out: str) -> None:
    import gc

    import torch
    import torch.distributed as dist

    import hhdpo.training.trainer as ht
    from hhdpo.core.config import Config

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    fake = types.SimpleNamespace(cfg=Config(), device=torch.device("cpu"), dtype=torch.float32, rank=rank, world=world,
                                 sharded=world > 1)
    build = _old_build if mode == "old" else ht.DPOTrainer._build_model
    warm = [build(fake, warmup_dir, trainable)[0] for trainable in (True, False)]
    _touch(warm)
    del warm
    gc.collect()  # FSDP wrappers hold reference cycles
    dist.barrier()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        policy = build(fake, model_dir, True)[0]
        ref = build(fake, model_dir, False)[0]
        _touch([policy, ref])
    seconds = time.perf_counter() - t0
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for m in (policy, ref) for p in m.parameters())
    Path(out, f"{mode}_rank{rank}.json").write_text(json.dumps({
        "added": mem.added, "before": mem.start, "peak": mem.peak, "after": mem.end, "hwm_reset": mem.hwm_reset,
        "param_bytes_held": 4 * held, "seconds": seconds}))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- parent


def make_model(out: Path, layers: int, hidden: int = 1536, vocab: int = 32000) -> int:
    """A random Llama (untied, bf16 safetensors); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=16384,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    return n


def run(mode: str, nproc: int, model_dir: Path, out: Path) -> list[dict]:
    """Start ``nproc`` workers; each measures its own setup."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "--worker", mode, "--model", str(model_dir), "--warmup-model", str(out / "warmup"), "--out", str(out)]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{mode}: workers failed:\n{p.stderr[-3000:]}")
    return [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(nproc)]


def llama8b_estimate(n: float = 8.03e9, gpus: int = 8, vocab: int = 128256, hidden: int = 4096) -> None:
    biggest = vocab * hidden  # the embedding (and the untied LM head): the largest single tensor
    print(f"\n# Llama-3.1-8B-Instruct estimate: N = {n:.3g} parameters, {gpus} GPUs (ranks) per node, one node's FSDP group; "
          "weights stored bf16 (2 B), policy fp32 master (4 B) + fp32 grads (4 B) + AdamW m, v (8 B), reference bf16 (2 B)")
    rows = [
        ("host RAM per node, before", f"{gpus} ranks x 4 B x N (each rank loads the full fp32 model, policy then reference)",
         gpus * 4 * n),
        ("host RAM per node, after", "rank 0: one tensor at a time, at most the largest (embedding 128256 x 4096) read bf16 "
         "+ its fp32 copy = (2 + 4) B x 5.25e8; other ranks: none", 6 * biggest),
        ("device per GPU, before: setup peak", "4 B x N / 8 (policy shard) + 4 B x N (full fp32 reference moved to the GPU "
         "before sharding)", 4 * n / gpus + 4 * n),
        ("device per GPU, before: training", "(4 + 4 + 8 + 4) B x N / 8 (policy master, grads, AdamW, fp32 reference)",
         20 * n / gpus),
        ("device per GPU, after: setup peak", "4 B x N / 8 (policy shard) + 2 B x N / 8 (reference shard) + on rank 0 "
         "the one full fp32 tensor being scattered, at most 4 B x 5.25e8", 6 * n / gpus + 4 * biggest),
        ("device per GPU, after: training", "(4 + 4 + 8 + 2) B x N / 8 (reference kept in bf16)", 18 * n / gpus),
    ]
    for name, formula, value in rows:
        print(f"  {name:38s} {value / GB:7.1f} GB   = {formula}")
    print("  (activations and the unsharded layer being computed come on top of the device figures)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=17, help="decoder layers of the random Llama (17: ~530M parameters)")
    ap.add_argument("--skip-old", action="store_true", help="do not run the old (full copy per rank) loading")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--warmup-model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.model, a.warmup_model, a.out)
        return 0

    import torch

    print(f"# torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="setup-memory-") as tmp:
        tmp = Path(tmp)
        n = make_model(tmp / "model", a.layers)
        make_model(tmp / "warmup", 2, hidden=96, vocab=1000)
        print(f"# random Llama: {n / 1e6:.0f}M parameters stored bf16, {4 * n / GB:.2f} GB per fp32 copy; "
              f"policy + reference = {8 * n / GB:.2f} GB in fp32", flush=True)
        results = {"1 process": run("plain", 1, tmp / "model", tmp), "2 ranks": run("sharded", 2, tmp / "model", tmp)}
        if not a.skip_old:
            results["2 ranks, old way"] = run("old", 2, tmp / "model", tmp)
    print("\n| setup | rank | RSS before GB | peak GB | added GB | params held GB | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ranks in results.items():
        for r, x in enumerate(ranks):
            print(f"| {name} | {r} | {x['before'] / GB:.2f} | {x['peak'] / GB:.2f} | {x['added'] / GB:.2f} | "
                  f"{x['param_bytes_held'] / GB:.2f} | {x['seconds']:.1f} |")
    single = results["1 process"][0]["added"]
    ratio = results["2 ranks"][1]["added"] / single
    print(f"\nRATIO rank 1 of 2 / 1 process (memory added by setting up policy + reference) = {ratio:.2f} "
          f"(target <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'})")
    print(f"RATIO rank 0 of 2 / 1 process = {results['2 ranks'][0]['added'] / single:.2f}")
    if "2 ranks, old way" in results:
        old = results["2 ranks, old way"]
        print(f"RATIO old way: rank 1 of 2 / 1 process = {old[1]['added'] / single:.2f}, "
              f"rank 0 of 2 / 1 process = {old[0]['added'] / single:.2f}")
    llama8b_estimate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
