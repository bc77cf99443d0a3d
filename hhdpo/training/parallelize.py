"""How the decoder layers run: activation checkpointing (full or selective), torch.compile per
layer and FSDP2 sharding with explicit prefetch, applied in torchtitan's order (checkpoint,
then compile, then shard) so the compiled region holds the checkpoint and FSDP's hooks stay eager.

Everything works per decoder layer (the FSDP units of ``decoder_layer_classes``) and leaves the
module tree, parameter names and state-dict keys as they were: checkpointing and compiling
change how a layer's forward runs, never what the model holds.
"""

from __future__ import annotations

import functools
import itertools
import types

import torch

AC_MODES = ("full", "selective")


def _saved_ops() -> frozenset:
    """The compute-bound ops whose outputs selective checkpointing keeps: matmuls and fused attention.

    Backward recomputes only the memory-bound rest (norms, rotary, SiLU x up), which costs a few
    percent of a layer's time; what is freed is their (often fp32) intermediates.
    """
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


@functools.cache
def _sac_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    saved = _saved_ops()

    def policy(_ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_contexts():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_sac_policy())


def _checkpointed_forward(self, *args, **kwargs):
    # one function for every layer (bound per instance): compiled layers share one code object
    # and so one compiled graph instead of a recompile per layer
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):  # eval and the frozen reference save nothing anyway
        return forward(self, *args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    # as HF's own checkpointing: a KV cache would be written twice (forward and recompute)
    for k in ("past_key_values", "layer_past"):
        if kwargs.get(k) is not None:
            kwargs[k] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    context_fn = _selective_contexts if self._hhdpo_ac_mode == "selective" else None
    extra = {"context_fn": context_fn} if context_fn else {}
    return checkpoint(forward, self, *args, use_reentrant=False, **extra, **kwargs)


def checkpoint_layers(layers: list[torch.nn.Module], mode: str) -> None:
    """Activation checkpointing inside each layer's forward (so inside FSDP's hooks, as
    torchtitan's checkpoint_wrapper): ``full`` keeps only each layer's input and recomputes the
    layer in backward; ``selective`` is op-level SAC: it also keeps the outputs of matmuls and
    attention (:func:`_saved_ops`) and recomputes only the cheap element-wise ops."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: expected one of {', '.join(AC_MODES)}")
    for layer in layers:
        layer._hhdpo_ac_mode = mode
        layer.forward = types.MethodType(_checkpointed_forward, layer)


def compile_layers(layers: list[torch.nn.Module]) -> None:
    """torch.compile each decoder layer (regional compilation): identical layers share one
    compiled graph, the embedding, LM head and loss stay eager, and FSDP2's hooks (skipped by
    dynamo) run eagerly between the compiled layers."""
    # the policy (train and eval), the live reference and the precompute pass each need their own
    # graphs, static then dynamic shapes: more than dynamo's default 8 entries per code object
    dyn = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(dyn, limit, max(getattr(dyn, limit), 32))
    for layer in layers:
        layer.compile()


def shard_layers(model: torch.nn.Module, layers: list[torch.nn.Module], mesh, mp, trainable: bool) -> None:
    """FSDP2 ``fully_shard`` per decoder layer then the root, with explicit prefetch.

    Resharding after forward, chosen for throughput where memory allows: the policy's last layer
    and root (embedding, final norm, LM head: FSDP2's default for a root) stay unsharded after
    forward, because backward starts with them at once (torchtitan does the same); every other
    policy layer is resharded and gathered again in backward. The frozen reference has no
    backward: all its units, the root included, are resharded after forward, so nothing of it
    stays gathered through the policy's backward.

    Prefetch: each layer's forward issues the next layer's all-gather right after its own (and the
    root the first layer's), and in backward the previous layer's; one unit ahead is FSDP2's
    implicit overlap, but issued from the CPU earlier, which matters when the CPU barely keeps up
    with the GPU (compiled layers, small micro-batches). Torch builds without the setters keep the
    implicit prefetch.
    """
    from torch.distributed.fsdp import fully_shard

    for i, layer in enumerate(layers):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=not trainable or i < len(layers) - 1)
    # the policy's root keeps FSDP2's own default (left unsaid: torch < 2.8 takes no None here)
    fully_shard(model, mesh=mesh, mp_policy=mp, **({} if trainable else {"reshard_after_forward": True}))
    if not layers or not hasattr(model, "set_modules_to_forward_prefetch"):
        return
    model.set_modules_to_forward_prefetch([layers[0]])
    for prev, nxt in itertools.pairwise(layers):
        prev.set_modules_to_forward_prefetch([nxt])
        if trainable:
            nxt.set_modules_to_backward_prefetch([prev])


def decoder_layers(model: torch.nn.Module, layer_cls: tuple[type, ...]) -> list[torch.nn.Module]:
    """The decoder layers in registration order, which is their forward order in HF causal LMs."""
    return [m for m in model.modules() if isinstance(m, layer_cls)]
