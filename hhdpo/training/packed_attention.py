"""Attention over a packed row (:mod:`hhdpo.data.packing`) that stays inside each sequence, exactly.

A packed forward passes ``position_ids`` (restarting at 0 per sequence) and transformers'
varlen arguments ``cu_seq_lens_q/k``, ``max_length_q/k``, with no 2D attention mask:

- a model whose attention implementation is flash-attention (``flash_attention_2``, ...)
  runs transformers' own varlen kernels on them, unchanged;
- any other model (``sdpa``, ``flex_attention``) is switched once, in place, to
  ``hhdpo_packed:<its implementation>``: a packed forward runs causal
  ``scaled_dot_product_attention`` on each sequence's slice (no N x N mask, no attention
  across sequences, the same arithmetic as the padded rows), and every other forward
  (padded, or a generation) goes to the model's own implementation and mask unchanged.

A row with each prompt once (:func:`hhdpo.data.packing.pack_shared_prompt`) passes ``position_ids``
and ``hhdpo_shared_prompt`` (its bounds) instead: hhdpo's attention runs prompt+chosen as one causal
sequence and the rejected tokens against the prompt's and their own keys. Flash-attention's varlen
kernels cannot express that pattern, so a flash-attention model is refused it.

The switch is permanent rather than per forward so that activation checkpointing, which
reruns a layer's forward during backward (outside any context), still sees it.
"""

from __future__ import annotations

import contextlib
import contextvars
from itertools import pairwise

import torch

from hhdpo.core.config import ConfigError
from hhdpo.data.packing import pair_bounds

PREFIX = "hhdpo_packed:"
SHARED = "hhdpo_shared_prompt"  # the model keyword that carries a shared-prompt row's bounds to every attention call
# set while hhdpo runs a packed forward: a call counter (no mask is built; every layer is checked to use us)
_PACKED: contextvars.ContextVar[list | None] = contextvars.ContextVar("hhdpo_packed", default=None)


def _is_flash(impl: str | None) -> bool:
    return bool(impl) and "flash" in impl


def default_padding_free(device: torch.device, model) -> bool:
    """``dpo_training.padding_free: null``: on CPU (exact per-sequence attention, measured faster than
    padding), and on a GPU where the model already runs a flash-attention (varlen) implementation;
    off on a GPU otherwise (the per-sequence SDPA loop there is exact but unmeasured)."""
    return device.type == "cpu" or _is_flash(model.config._attn_implementation)


def resolve_share_prompt(setting: bool | None, padding_free: bool, model) -> bool:
    """``dpo_training.share_prompt``: null = on with padding-free rows unless the model runs flash-attention
    (whose varlen kernels cannot attend to a shared prompt); true there is refused."""
    flash = _is_flash(model.config._attn_implementation)
    if setting and flash:
        raise ConfigError(f"dpo_training.share_prompt: true, but the model runs {model.config._attn_implementation}, "
                          "whose varlen kernels cannot attend to a shared prompt: set it to false or null")
    return padding_free and not flash if setting is None else setting


def _base(config) -> str:
    return config._attn_implementation.removeprefix(PREFIX)


def _packed_mask(*args, attention_mask=None, config=None, **kwargs):
    """The mask interface of ``hhdpo_packed:*``: none for a packed forward (its attention needs none), else the base's."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if _PACKED.get() is not None and attention_mask is None:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[_base(config)](*args, attention_mask=attention_mask, config=config, **kwargs)


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The attention interface of ``hhdpo_packed:*``.

    With ``cu_seq_lens_q`` (a packed forward, or its recomputation in backward): causal SDPA on
    each sequence's slice of query/key/value (1, heads, N, head_dim); returns (1, N, heads, head_dim).
    Without: the base implementation, as the model would have run it.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    shared, cu = kwargs.get(SHARED), kwargs.get("cu_seq_lens_q")
    if shared is None and cu is None:
        return ALL_ATTENTION_FUNCTIONS[_base(module.config)](module, query, key, value, attention_mask,
                                                             dropout=dropout, scaling=scaling, **kwargs)
    calls = _PACKED.get()
    if calls is not None:
        calls[0] += 1
    if shared is not None:
        return _shared_prompt_attention(module, query, key, value, shared, dropout, scaling, kwargs.get("sliding_window")), None
    bounds = cu.tolist()
    _check_packed(query, [e - s for s, e in pairwise(bounds)], kwargs.get("sliding_window"))
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                   dropout=dropout, scaling=scaling, is_causal=True)[0]
            for s, e in pairwise(bounds)]
    return torch.cat(outs, dim=1), None


def _check_packed(query, lengths: list[int], window) -> None:
    """A packed forward's query is one row, and no sequence (``lengths``) outruns a sliding window it cannot apply."""
    if query.shape[0] != 1:
        raise RuntimeError(f"a packed forward has batch size 1, got {query.shape[0]}")
    if window and max(lengths) > window:
        raise RuntimeError(f"padding-free attention has no sliding window ({window} tokens) and a sequence is longer; "
                           "set dpo_training.padding_free: false")


def _shared_prompt_attention(module, query, key, value, bounds: torch.Tensor, dropout: float, scaling, window):
    """Attention over a :func:`hhdpo.data.packing.pack_shared_prompt` row, query/key/value (1, heads, N, head_dim):
    per pair, causal SDPA over prompt+chosen, and the rejected queries over the prompt's keys and their
    own (the causal mask aligned to the last key: rejected token i sees prompt + rejected tokens <= i).
    Returns (1, N, heads, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pairs = pair_bounds(bounds.tolist())
    _check_packed(query, [n for s, p, c, r in pairs for n in (c - s, p - s + r - c)], window)
    outs = []
    for s, p, c, r in pairs:
        outs.append(sdpa_attention_forward(module, query[:, :, s:c], key[:, :, s:c], value[:, :, s:c], None,
                                           dropout=dropout, scaling=scaling, is_causal=True)[0])
        k = torch.cat([key[:, :, s:p], key[:, :, c:r]], dim=2)
        v = torch.cat([value[:, :, s:p], value[:, :, c:r]], dim=2)
        mask = torch.ones(r - c, p - s + r - c, dtype=torch.bool, device=query.device).tril(p - s)[None, None]
        outs.append(sdpa_attention_forward(module, query[:, :, c:r], k, v, mask, dropout=dropout, scaling=scaling)[0])
    return torch.cat(outs, dim=1)


def use_packed_attention(model) -> bool:
    """Make ``model`` able to run packed rows (idempotent); True when hhdpo's per-sequence attention
    runs them, False when the model's own flash-attention varlen path does."""
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    impl = model.config._attn_implementation
    if impl.startswith(PREFIX):
        return True
    if _is_flash(impl):
        return False
    if impl not in ALL_ATTENTION_FUNCTIONS or impl not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise RuntimeError(f"{type(model).__name__} uses attention {impl!r}; padding-free batches need sdpa, flex_attention "
                           "or flash-attention: set dpo_training.padding_free: false")
    AttentionInterface.register(PREFIX + impl, _packed_attention)
    AttentionMaskInterface.register(PREFIX + impl, _packed_mask)
    model.config._attn_implementation = PREFIX + impl
    return True


def packed_kwargs(group: dict) -> dict:
    """Model inputs of a packed group (:func:`hhdpo.data.packing.pack_rows`, or ``pack_shared_prompt``):
    no attention mask; the positions and transformers' varlen arguments (or the shared-prompt bounds)
    say where each sequence lies."""
    if "bounds" in group:
        return {"input_ids": group["input_ids"], "position_ids": group["position_ids"], SHARED: group["bounds"]}
    cu, m = group["cu_seqlens"], group["max_seqlen"]
    return {"input_ids": group["input_ids"], "position_ids": group["position_ids"],
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


@contextlib.contextmanager
def packed_forward(model, shared_prompt: bool = False):
    """Around a packed forward of ``model`` (``shared_prompt``: of a shared-prompt row): installs the
    attention (:func:`use_packed_attention`) and, after the block, checks that it really ran; a
    model whose layers ignore the attention interface would otherwise attend across sequences unnoticed."""
    ours = use_packed_attention(model)
    if shared_prompt and not ours:
        raise RuntimeError(f"{type(model).__name__} runs {model.config._attn_implementation}, whose varlen kernels cannot "
                           "attend to a shared prompt: set dpo_training.share_prompt: false")
    calls = [0]
    token = _PACKED.set(calls)
    try:
        yield
    finally:
        _PACKED.reset(token)
    if ours and calls[0] == 0:
        raise RuntimeError(f"{type(model).__name__} did not call transformers' attention interface; padding-free "
                           "batches cannot be used with it: set dpo_training.padding_free: false")
