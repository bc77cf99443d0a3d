"""Size a training run before submitting it: its schedule, memory per GPU, host RAM per node,
time and SLURM attempts, and the sbatch options that follow. Loads no model and starts no
process group.

    hhdpo plan --config configs/llama31_8b.yaml --nodes 4 --gpus-per-node 8
    hhdpo plan --config configs/llama31_8b.yaml --nodes 1 --gpus-per-node 8 --tokens-per-s-per-gpu 1500
    hhdpo plan --config F --pairs-per-s 40 --pairs 80000 --gpu-mem-gib 40

Pairs: a local dataset is parsed (hhdpo.data.hh); the Hub's Anthropic/hh-rlhf is counted from its
known subset sizes and the split's slice; --pairs N overrides both. The model's shape comes from
its local config.json (a directory, or the Hugging Face cache) or a built-in table. Throughput:
--tokens-per-s-per-gpu is the trainer's logged tokens/s (real, unpadded tokens, all ranks) divided
by the GPUs; --pairs-per-s is pairs per second for the whole run. Without either, a measured
model-FLOP/s figure is assumed (printed). Every assumption is printed beside what it decides.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from hhdpo.core.config import Config, ConfigError
from hhdpo.core.errors import BadInput
from hhdpo.core.models import ALIASES
from hhdpo.data.hh import load_pairs
from hhdpo.data.sources import HH_HUB_ID, is_local, plan_parts, split_bounds, split_name
from hhdpo.training.schedule import Schedule, schedule, schedule_line, schedule_warnings

# Anthropic/hh-rlhf records per subset and split. Train total 160,800 and test 8,552: the dataset card of
# HuggingFaceH4/hh-rlhf-h4 (a conversion of all four subsets); per subset, train + test agree with the
# Hub viewer's rounded subset sizes (44.8k, 46.2k, 23.1k, 55.2k); harmless-base test counted from its file.
HH_RECORDS = {
    "train": {"harmless-base": 42_537, "helpful-base": 43_835, "helpful-online": 22_007, "helpful-rejection-sampled": 52_421},
    "test": {"harmless-base": 2_312, "helpful-base": 2_354, "helpful-online": 1_137, "helpful-rejection-sampled": 2_749},
}
# Architectures known without a config.json (values from their config.json on the Hub).
_LLAMA31_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, torch_dtype="bfloat16")
_SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, torch_dtype="bfloat16")
KNOWN_MODELS = {
    "meta-llama/llama-3.1-8b-instruct": _LLAMA31_8B, "meta-llama/llama-3.1-8b": _LLAMA31_8B,
    "meta-llama/meta-llama-3.1-8b-instruct": _LLAMA31_8B,
    "huggingfacetb/smollm2-135m-instruct": _SMOLLM2_135M, "huggingfacetb/smollm2-135m": _SMOLLM2_135M,
    "smollm2": _SMOLLM2_135M,  # the offline alias (hhdpo.core.models.ALIASES): no conversion just to plan
}
GiB = 2**30
# Measured on this project's CI machine (README "Benchmarks"; SmolLM2's tokenizer and chat template on the real
# harmless-base test file, max_prompt_len = max_len / 2): real tokens per pair (prompt + chosen + prompt +
# rejected) at each max_len and the prompt's share of them, which a shared-prompt row forwards once;
# host bytes per pair each rank keeps (parsed pair ~4.9 kB, token ids ~21 B each), and parse+tokenize time.
TOKENS_PER_PAIR = {256: 288, 512: 373, 1024: 391}
PROMPT_TOKENS_PER_PAIR = {256: 99, 512: 141, 1024: 149}
HOST_BYTES_PER_PAIR, HOST_BYTES_PER_TOKEN = 4_900, 21
TOKENIZE_S_PER_PAIR = 0.005
# Assumed throughput: 50 model TFLOP/s per GPU (6N per token, +2N for a live reference), measured on one H100
# for Llama-3.1-8B's layer shape (README "Benchmarks"); 0.19 on a CPU rank (fp32, same table).
MODEL_FLOPS_GPU, MODEL_FLOPS_CPU = 50e12, 0.19e12
# Assumed: a GPU rank's host RSS before data (0.4 GiB of imports measured, plus CUDA, cuBLAS and NCCL),
# 1 GB/s of file I/O per node (weights, checkpoints), 60 s to import and meet the other ranks.
RANK_HOST_GPU, RANK_HOST_CPU = 3 * GiB, 0.5 * GiB
IO_BYTES_PER_S, START_S = 1e9, 60
RUNTIME_GPU = 3 * GiB  # CUDA context, NCCL buffers, allocator fragmentation (assumed)


@dataclass(frozen=True)
class Arch:
    """A Llama-family decoder's shape (Llama, Mistral, Qwen2, SmolLM2: the attention + SwiGLU layout)."""

    source: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    stored_bytes: int  # bytes per parameter in its checkpoint
    bias: int = 0  # bias parameters per layer

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate + 2 * self.hidden + self.bias

    @property
    def root_params(self) -> int:  # the root FSDP unit: embeddings, LM head (unless tied), final norm
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params


def arch_from_config(c: dict, source: str) -> Arch:
    if any(k in c for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ConfigError(f"policy_model: {source} is a mixture of experts; the estimate knows dense decoders only")
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if not isinstance(c.get(k), int)]
    if missing:
        raise ConfigError(f"policy_model: {source} has no {', '.join(missing)}; the estimate knows Llama-family decoders")
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv, hd, inter = c.get("num_key_value_heads") or heads, c.get("head_dim") or h // heads, c["intermediate_size"]
    bias = (heads * hd + 2 * kv * hd + h if c.get("attention_bias") else 0) + (2 * inter + h if c.get("mlp_bias") else 0)
    dtype = str(c.get("torch_dtype") or c.get("dtype") or "bfloat16")
    return Arch(source, h, c["num_hidden_layers"], heads, kv, hd, inter, c["vocab_size"], bool(c.get("tie_word_embeddings")),
                4 if "32" in dtype else 2, bias)


def model_arch(spec: str) -> Arch:
    """The shape of ``spec`` from a local config.json, else the built-in table; never loads weights."""
    local = Path(spec).expanduser() / "config.json"
    if not local.is_file() and spec not in ALIASES and spec.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json")
            local = Path(cached) if isinstance(cached, str) else local
        except Exception:  # noqa: BLE001 - no hub client or a malformed id: fall back to the table
            pass
    if local.is_file():
        return arch_from_config(json.loads(local.read_text()), str(local))
    if spec.lower() in KNOWN_MODELS:
        return arch_from_config(KNOWN_MODELS[spec.lower()], f"{spec} (built-in table)")
    known = ", ".join(sorted(k for k in KNOWN_MODELS if "/" in k))
    raise ConfigError(f"policy_model: {spec!r} has no local config.json (a directory or the Hugging Face cache) and "
                      f"is not a known architecture ({known}); point policy_model at a local model directory")


def count_pairs(cfg: Config, override: int | None) -> tuple[int, str]:
    """Pairs the run trains and validates on, and where the number comes from."""
    ds = cfg.dataset
    if override is not None:
        return override, "--pairs"
    if is_local(ds.dataset_name):
        pairs, skipped = load_pairs(ds.dataset_name, ds.subset, ds.data_dirs, log=None)
        return len(pairs), f"parsed from {ds.dataset_name} {ds.subset} ({sum(skipped.values()):,} records skipped)"
    parts = plan_parts(ds.dataset_name, ds.subset, ds.data_dirs)
    sizes = HH_RECORDS.get(split_name(ds.subset), {}) if ds.dataset_name.lower() == HH_HUB_ID.lower() else {}
    if not all(p.name in sizes for p in parts):
        raise ConfigError(f"dataset.dataset_name: {ds.dataset_name} {ds.subset} has no local copy and no known size; "
                          "give --pairs N (or a local file or directory)")
    n = sum(max(0, b - a) for a, b in (split_bounds(sizes[p.name], ds.subset) for p in parts))
    return n, (f"records of {ds.dataset_name} {ds.subset} in {len(parts)} subset(s), from their known sizes "
               "(parsing skips a few: 0.4% of harmless-base test)")


def tokens_per_pair(max_len: int, table: dict[int, int] = TOKENS_PER_PAIR) -> float:
    """Mean real tokens per pair at ``max_len`` (or the prompt's, with ``PROMPT_TOKENS_PER_PAIR``),
    interpolated in the measured table."""
    pts = sorted(table.items())
    if max_len <= pts[0][0]:
        return pts[0][1] * max_len / pts[0][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if max_len <= x1:
            return y0 + (y1 - y0) * (max_len - x0) / (x1 - x0)
    return pts[-1][1]


def gpu_memory(a: Arch, cfg: Config, world: int, c: int, sharded: bool, gpu: bool = True) -> list[tuple[str, float, float]]:
    """(what, bytes with activation checkpointing, bytes without) per rank, summed into a total."""
    t, ds, n, w = cfg.dpo_training, cfg.dataset, a.params, world
    live_ref = not (t.reference_free or t.precompute_ref_log_probs)
    cname = {2: "bf16", 4: "fp32"}[c]
    share = f"1/{w}" if sharded else "whole"
    rows = [(f"parameters: fp32 master weights, {share}", 4 * n / w), (f"gradients: fp32, {share}", 4 * n / w)]
    if t.defer_grad_sync and sharded:  # until the last micro-batch every rank holds every gradient unsharded
        rows.append(("unsharded fp32 gradients (dpo_training.defer_grad_sync)", 4 * n))
    rows.append((f"optimizer: AdamW fp32 exp_avg + exp_avg_sq, {share}", 8 * n / w))
    if live_ref:
        rows.append((f"reference model: {cname}, {share}", c * n / w))
    if sharded:  # one layer gathered plus the next prefetched; the root unit stays gathered through backward,
        # and its gradients (embeddings, LM head) wait unsharded, then in fp32, for the last reduce-scatter
        rows.append(("FSDP2 gathered units and the root's gradients", c * (a.root_params + 2 * a.layer_params)
                     + (c + 4) * a.root_params))
    rows = [(k, v, v) for k, v in rows]
    # a forward's tokens, worst case: a micro-batch's chosen + rejected rows all at max_len, or under a token
    # budget the budget (one pair, up to 2 x max_len, may exceed it alone)
    budget = t.max_tokens_per_micro_batch
    tok = max(budget, 2 * ds.max_len) if budget else 2 * t.batch_size * ds.max_len
    h, kv, inter = a.hidden, a.kv_heads * a.head_dim, a.intermediate
    # per token and layer what HF's Llama layer keeps for backward: norm outputs, q/k before and after rotary,
    # attention inputs and output, the SwiGLU intermediates (4 x intermediate), the norms' fp32 internals
    layer = tok * (c * (9 * h + 2 * kv + 4 * inter) + 16 * h)
    what = (f"<= {tok:,} tokens per forward (max_tokens_per_micro_batch {budget:,})" if budget
            else f"{t.batch_size} pairs x 2 rows x {ds.max_len} tokens")
    rows.append((f"activations: {what}, {a.layers} layers", tok * c * h * a.layers + 2 * layer, (a.layers + 1) * layer))
    chunk = t.logits_chunk_tokens
    if chunk:  # one chunk's logits at a time, recomputed in backward: its fp32 copy, then the gradient
        logits = min(tok, chunk) * a.vocab * (2 * c + 8)
        rows.append((f"logits: {min(tok, chunk):,} positions at once (logits_chunk_tokens) x {a.vocab:,}", logits, logits))
    else:  # the head at every position (worst case): the policy's logits and their fp32 copy, the
        # reference's at the same time, then their gradient
        logits = tok * a.vocab * (2 * c + 8 if live_ref else c + 8)
        rows.append((f"logits: {tok:,} positions x {a.vocab:,} vocabulary", logits, logits))
    if gpu:
        rows.append(("CUDA context, NCCL, allocator slack (assumed)", RUNTIME_GPU, RUNTIME_GPU))
    return rows


def _gib(b: float) -> str:
    return f"{b / GiB:,.1f}"


def _minutes(s: float) -> str:
    return f"{s / 60:,.0f} min" if s >= 600 else f"{s / 60:.1f} min"


def _slurm_time(minutes: int) -> str:
    d, m = divmod(int(minutes), 1440)
    return (f"{d}-" if d else "") + f"{m // 60:02d}:{m % 60:02d}:00"


def plan(cfg: Config, args, out=None) -> int:
    out = out or sys.stdout
    s_cfg, t, ds = cfg.slurm, cfg.dpo_training, cfg.dataset
    nodes = args.nodes if args.nodes is not None else s_cfg.nodes
    gpus = args.gpus_per_node if args.gpus_per_node is not None else s_cfg.gpus_per_node
    for name, v, lo in (("--nodes", nodes, 1), ("--gpus-per-node", gpus, 0), ("--pairs", args.pairs, 1),
                        ("--tokens-per-s-per-gpu", args.tokens_per_s_per_gpu, 1e-9), ("--pairs-per-s", args.pairs_per_s, 1e-9),
                        ("--gpu-mem-gib", args.gpu_mem_gib, 1e-9), ("--tokens-per-pair", args.tokens_per_pair, 1e-9)):
        if v is not None and v < lo:
            raise BadInput(f"{name}: got {v}, expected a number >= {lo:g}")
    if cfg.precision == "fp16":
        raise ConfigError("precision: fp16 is not supported for training (no loss scaling); use bf16 (or fp32)")
    per_node = gpus or s_cfg.ranks_per_node
    world = nodes * per_node
    c = 2 if cfg.precision == "bf16" or (cfg.precision == "auto" and gpus) else 4
    sharded = world > 1 or c == 2 or bool(t.fsdp)
    a = model_arch(cfg.policy_model)
    pairs, pairs_from = count_pairs(cfg, args.pairs)
    s: Schedule = schedule(pairs, world, cfg)
    n = a.params
    live_ref = not (t.reference_free or t.precompute_ref_log_probs)
    dev = f"{nodes} node(s) x {gpus} GPU(s)" if gpus else f"{nodes} node(s) x {per_node} CPU rank(s)"
    p = lambda *x: print(*x, file=out)  # noqa: E731
    p(f"hhdpo plan: {args.config} on {dev} (world size {world}), {'bf16' if c == 2 else 'fp32'} compute, "
      f"{'FSDP2 full sharding' if sharded else 'one unwrapped process'}")
    p(f"data:     {pairs:,} pairs: {pairs_from}")
    size = f"{n / 1e9:.3g}e9" if n >= 1e9 else f"{n / 1e6:.0f}M"
    p(f"model:    {size} parameters ({n:,}), {a.layers} layers, hidden {a.hidden}, vocab {a.vocab:,}: {a.source}")
    p(schedule_line(s))
    for w in schedule_warnings(s):
        p(f"warning:  {w}")

    rows = gpu_memory(a, cfg, world, c, sharded, gpu=bool(gpus))
    where = "GPU" if gpus else "rank (host RAM on CPU)"
    p(f"\n{'memory per ' + where + ', GiB':<64}{'with AC':>9}{'without AC':>13}")
    for k, v_ac, v_no in rows:
        p(f"  {k:<62}{_gib(v_ac):>9}{_gib(v_no):>13}")
    tot_ac, tot_no = sum(r[1] for r in rows), sum(r[2] for r in rows)
    p(f"  {'total':<62}{_gib(tot_ac):>9}{_gib(tot_no):>13}")
    used = "on" if t.activation_checkpointing else "off"
    if gpus:
        cap = args.gpu_mem_gib * GiB
        fit = lambda b: "fits" if b <= cap else "does NOT fit"  # noqa: E731
        p(f"  on {args.gpu_mem_gib:g} GiB GPUs: {fit(tot_ac)} with activation checkpointing, {fit(tot_no)} without "
          f"(this config: dpo_training.activation_checkpointing {used})")

    tpp = args.tokens_per_pair or tokens_per_pair(ds.max_len)
    # what a pair forwards: the prompt once with share_prompt, whose null is on where padding-free is (on CPU;
    # on a GPU only with flash-attention, which refuses it, so off)
    shared = t.share_prompt if t.share_prompt is not None else not gpus and t.padding_free is not False
    fwd = tpp * (1 - tokens_per_pair(ds.max_len, PROMPT_TOKENS_PER_PAIR) / tokens_per_pair(ds.max_len)) if shared else tpp
    data_host = pairs * (HOST_BYTES_PER_PAIR + HOST_BYTES_PER_TOKEN * tpp)
    # on CPU ranks the "device" memory above is host RAM too (at the config's activation checkpointing)
    dev_host = 0 if gpus else tot_ac if t.activation_checkpointing else tot_no
    rank_host = (RANK_HOST_GPU if gpus else RANK_HOST_CPU) + data_host + dev_host
    largest = max(a.vocab, a.intermediate) * a.hidden * a.stored_bytes
    # sharded: rank 0 reads one tensor at a time and scatters it (hhdpo.training.sharded_load);
    # one unwrapped process loads the whole model in fp32 on the host first
    load_extra = largest if sharded else (4 * n if gpus else 0)
    export_extra = 4 * n + (c * n if c != 4 else 0)  # rank 0 gathers the fp32 state dict, then casts it to save
    load, export = per_node * rank_host + load_extra, per_node * rank_host + export_extra
    p(f"\nhost RAM per node, GiB (every rank parses and tokenizes all {pairs:,} pairs: {_gib(data_host)} each)")
    p(f"  at load:   {per_node} ranks x {_gib(rank_host)} + {_gib(load_extra)} "
      f"({'rank 0 reads the largest tensor, scatters the shards' if sharded else 'the fp32 model before the GPU'}) = {_gib(load)}")
    cast = " and its bf16 copy" if c == 2 else ""
    p(f"  at export (node 0): {per_node} ranks x {_gib(rank_host)} + {_gib(export_extra)} "
      f"(rank 0 gathers the fp32 state dict{cast}) = {_gib(export)}")
    ckpt_bytes = 12 * n  # fp32 weights + AdamW's two fp32 states (DCP shards; the trainer state is small)
    p(f"  disk: {_gib(ckpt_bytes)} GiB per checkpoint x checkpoint.keep_last {cfg.checkpoint.keep_last} "
      f"+ the exported model {_gib(c * n)} GiB")

    train_flops = (6 + (2 if live_ref else 0)) * n
    if args.pairs_per_s:
        pps, how = args.pairs_per_s, f"{args.pairs_per_s:g} pairs/s (--pairs-per-s)"
    else:
        # the trainer logs tokens/s with the prompt counted twice (tpp per pair); the assumed FLOP rate
        # covers only what is forwarded (fwd per pair)
        per_pair = tpp if args.tokens_per_s_per_gpu else fwd
        tps = args.tokens_per_s_per_gpu or (MODEL_FLOPS_GPU if gpus else MODEL_FLOPS_CPU) / train_flops
        pps = tps * world / per_pair
        src = "--tokens-per-s-per-gpu" if args.tokens_per_s_per_gpu else (
            f"assumed: {(MODEL_FLOPS_GPU if gpus else MODEL_FLOPS_CPU) / 1e12:g} model TFLOP/s per {'GPU' if gpus else 'rank'}")
        what = "forwarded, each prompt once (dpo_training.share_prompt)" if per_pair != tpp else "per pair"
        how = (f"{tps:,.0f} tokens/s per {'GPU' if gpus else 'rank'} ({src}) / {per_pair:,.0f} tokens {what}"
               f"{'' if args.tokens_per_pair else ' (measured on HH)'} = {pps:,.1f} pairs/s")
    val_cost = (2 + (2 if live_ref else 0)) / (6 + (2 if live_ref else 0))  # forward only, against a training pair
    train_s = s.total_steps * s.global_batch / pps
    val_s = s.validations * s.val_pairs_scored * val_cost / pps
    ref_s = pairs * (2 / 6) / pps if t.precompute_ref_log_probs and not t.reference_free else 0.0
    io = IO_BYTES_PER_S * nodes
    ckpt_s = s.checkpoints * ckpt_bytes / io
    export_s = c * n / IO_BYTES_PER_S
    work = train_s + val_s + ref_s + ckpt_s + export_s
    start = START_S + pairs * TOKENIZE_S_PER_PAIR + (a.stored_bytes * n * (2 if live_ref else 1)) / IO_BYTES_PER_S \
        + ckpt_bytes / io
    p(f"\ntime at {how}")
    p(f"  train {_minutes(train_s)} ({s.total_steps:,} steps x {s.global_batch} pairs) + {s.validations} validation(s) "
      f"{_minutes(val_s)}" + (f" + reference pass {_minutes(ref_s)}" if ref_s else "")
      + f" + {s.checkpoints} checkpoint(s) {_minutes(ckpt_s)} + export {_minutes(export_s)} = {_minutes(work)}")
    lead = s_cfg.signal_delay
    usable = s_cfg.time * 60 - lead - start
    allowed = 1 + s_cfg.max_num_timeout
    p(f"  per attempt: slurm.time {s_cfg.time} min - signal lead {lead / 60:g} min - start-up ~{_minutes(start)} "
      f"(tokenize {pairs:,} pairs, read the weights, resume) = {_minutes(max(usable, 0))} of work")
    attempts = math.ceil(work / usable) if usable > 0 else math.inf
    fits = attempts <= allowed
    need = math.ceil((work / allowed + lead + start) / 60)
    needed = f"{attempts} needed" if usable > 0 else "none gets work done"
    p(f"  attempts: {needed}, {allowed} allowed (1 + slurm.max_num_timeout {s_cfg.max_num_timeout}): "
      + ("fits" if fits else f"does NOT fit: give slurm.time >= {need} min, or more slurm.max_num_timeout"))
    mem = math.ceil(1.2 * max(load, export) / GiB)
    minutes = s_cfg.time if fits else need
    opts = f"--nodes={nodes} --ntasks-per-node={per_node}" + (f" --gpus-per-node={gpus}" if gpus else "")
    p(f"\nsbatch:   {opts} --time={_slurm_time(minutes)} --mem={mem}G   (--mem: the host peak + 20%)")
    p(f"submit:   hhdpo submit train --config {args.config} slurm.nodes={nodes} slurm.gpus_per_node={gpus} "
      f"slurm.time={minutes} slurm.mem={mem}G")
    return 0


def cli(argv: list[str] | None = None) -> int:
    from hhdpo.core.stage import StageParser, load_stage_config, run_stage, spellings

    ap = StageParser("hhdpo plan", __doc__)
    ap.flag("nodes", type=int, metavar="N", help="training nodes (default: slurm.nodes)")
    ap.flag("gpus_per_node", type=int, metavar="G", help="GPUs (ranks) per node (default: slurm.gpus_per_node; "
            "0: CPU ranks, slurm.tasks_per_node of them)")
    rate = ap.add_mutually_exclusive_group()
    rate.add_argument(*spellings("tokens_per_s_per_gpu"), dest="tokens_per_s_per_gpu", type=float, metavar="X",
                      help="the trainer's logged tokens/s divided by the GPUs (default: assumed, printed)")
    rate.add_argument(*spellings("pairs_per_s"), dest="pairs_per_s", type=float, metavar="X",
                      help="pairs per second for the whole run")
    ap.flag("tokens_per_pair", type=float, metavar="T", help="real tokens per pair (default: measured on HH at max_len)")
    ap.flag("pairs", type=int, metavar="N", help="pairs in the selected dataset (default: counted or known)")
    ap.flag("gpu_mem_gib", type=float, default=80.0, metavar="GIB", help="memory per GPU (default 80)")
    args = ap.parse(argv)
    return run_stage("hhdpo plan", lambda: plan(load_stage_config(args), args))


if __name__ == "__main__":
    sys.exit(cli())
