"""Run-time choices and model set-up for the trainer: the preflight checks, device, backend and
dtype (never edited into code), and the FSDP2-sharded policy and reference models."""

from __future__ import annotations

import copy
import os

import torch

from hhdpo.core.config import Config, ConfigError
from hhdpo.core.models import decoder_layer_classes, load_model, resolve_model
from hhdpo.data.hh import load_pairs
from hhdpo.training.checkpoint import find_resume_checkpoint, starts_over
from hhdpo.training.parallelize import checkpoint_layers, compile_layers, decoder_layers, shard_layers
from hhdpo.training.precision import warn_if_cpu_bf16_emulated
from hhdpo.training.sharded_load import load_sharded, meta_model


def check_training_precision(cfg: Config) -> None:
    if cfg.precision == "fp16":
        # fp16 gradients underflow without loss scaling, and there is no FSDP2-aware scaler here
        raise ConfigError("precision: fp16 is not supported for training (no loss scaling); use bf16 (or fp32)")


def resolve_runtime(cfg: Config) -> tuple[torch.device, str, torch.dtype]:
    """Device, process-group backend and compute dtype, decided at run time."""
    check_training_precision(cfg)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        # under --gpus-per-task=1 every task sees one device, cuda:0, whatever its LOCAL_RANK
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if use_cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if not use_cuda and dtype == torch.bfloat16 and os.environ.get("LOCAL_RANK", "0") == "0":
        warn_if_cpu_bf16_emulated()  # once per node: the ranks share the CPU
    return device, ("nccl" if use_cuda else "gloo"), dtype


_DROPOUT_NAMES = ("dropout", "pdrop", "layerdrop")  # attention_dropout, resid_pdrop, layerdrop, ...


def _is_dropout_rate(name: str, value) -> bool:
    return any(n in name.lower() for n in _DROPOUT_NAMES) and isinstance(value, (int, float)) and not isinstance(value, bool)


def disable_dropout(model) -> list[str]:
    """Dropout off everywhere in ``model``, as TRL's DPO does; returns what it changed.

    Every ``nn.Dropout`` gets p=0, and every positive dropout rate a module or the model's config
    holds as a number (Llama's attention ``attention_dropout``, GPT-2's ``*_pdrop``, OPT's
    ``layerdrop``, read at forward time in train mode) becomes 0. The policy trains in train mode;
    with dropout it would not compute what the frozen reference computes, and the first step's
    loss (policy == reference) would not be ln 2.
    """
    from transformers import PretrainedConfig

    changed = []
    configs = [("config", model.config)]
    configs += [(f"config.{k}", v) for k, v in vars(model.config).items() if isinstance(v, PretrainedConfig)]
    for where, config in configs:
        for k, v in list(vars(config).items()):
            if _is_dropout_rate(k, v) and v:
                setattr(config, k, 0.0)
                changed.append(f"{where}.{k}={v}")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            if module.p:
                changed.append(f"{name}.p={module.p}")
            module.p = 0.0
            continue
        for k, v in list(vars(module).items()):
            if not k.startswith("_") and _is_dropout_rate(k, v) and v:
                setattr(module, k, 0.0)
                changed.append(f"{name}.{k}={v}")
    return changed


def build_model(cfg: Config, spec: str, trainable: bool, device: torch.device, compute_dtype: torch.dtype, world: int,
                shard: bool):
    """The policy (trainable: fp32 master weights) or the frozen reference (in the compute dtype),
    sharded with FSDP2 over ``world`` ranks when ``shard`` (else plain on ``device``); returns
    (model, its HF config, architecture name)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # fp32 master weights for training (bf16 only as FSDP's compute dtype); a frozen model needs no fp32 copy
    dtype = torch.float32 if trainable else compute_dtype
    trc = cfg.trust_remote_code
    # sharded: no rank holds the weights in host RAM; rank 0 streams them into the shards below
    model = meta_model(spec, dtype, trc) if shard else load_model(spec, dtype=dtype, trust_remote_code=trc)
    hf_config = copy.deepcopy(model.config)
    arch = type(model).__name__
    model.config.use_cache = False
    disable_dropout(model)  # after the copy: the exported config keeps the base model's rates
    t = cfg.dpo_training
    checkpointed = trainable and t.activation_checkpointing
    layers = decoder_layers(model, decoder_layer_classes(model, t.fsdp_layer_cls)) if shard or t.compile or checkpointed else []
    # torchtitan's order (hhdpo.training.parallelize): checkpoint, compile, then shard
    if checkpointed:
        checkpoint_layers(layers, t.ac_mode)
    if t.compile:
        compile_layers(layers)
    if shard:
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if dtype != compute_dtype else MixedPrecisionPolicy()
        shard_layers(model, layers, mesh, mp, trainable)
        load_sharded(model, spec, device)
    else:
        model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model, hf_config, arch


def preflight(cfg: Config) -> None:
    """Fail fast, before any process is spawned or anything is written."""
    check_training_precision(cfg)
    ds = cfg.dataset
    load_pairs(ds.dataset_name, ds.subset, ds.data_dirs, log=None)
    resolve_model(cfg.policy_model)
    resolve_model(cfg.ref_model_path)
    if find_resume_checkpoint(cfg) is None:
        starts_over(cfg)  # refuses a save_dir holding a completed (or unknown) run; an unfinished one starts over
