"""AdamW, the learning-rate schedule and one clipped optimizer step."""

from __future__ import annotations

import math

import torch


def lr_lambda(warmup: int, total: int, kind: str):
    """Linear warmup, then constant, linear-to-zero or cosine-to-zero."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_optimizer(model, t, total_steps: int):
    """AdamW and its LambdaLR schedule from the ``dpo_training`` section ``t``."""
    # fused: one kernel over all parameters (2.7x faster step than foreach on CPU; on DTensors too)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, total_steps, t.lr_scheduler))
    return opt, sched


def set_grad_sync(model, micro: int, accumulation: int, defer: bool) -> None:
    """Before micro-batch ``micro`` of ``accumulation``: whether FSDP2 reduce-scatters its gradients.

    By default every micro-batch's backward reduce-scatters into the sharded gradients (which
    accumulate there), as torchtitan does: a rank never holds more than the layer being reduced
    unsharded. ``defer`` (``dpo_training.defer_grad_sync``) syncs only on the last micro-batch:
    fewer collectives, but until then every rank accumulates every parameter's whole unsharded
    fp32 gradient (4 B x N: ~32 GB for an 8B model). A model without FSDP is left alone.
    """
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(not defer or micro == accumulation - 1)


def optimizer_step(model, opt, sched, max_grad_norm: float) -> tuple[float, float]:
    """Clip the gradients (``max_grad_norm`` 0: no clipping), step, zero them; returns the
    pre-clipping global gradient norm and the learning rate this step used."""
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(grad_norm), lr
