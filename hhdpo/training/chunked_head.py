"""The LM head in chunks: response-token log-probs without a [tokens, vocab] fp32 tensor.

:func:`chunked_token_logps` projects, log-softmaxes and gathers ``chunk`` tokens at a time and
recomputes each chunk's logits in backward, so only one chunk's logits (and their gradient)
exist at once: for an 8B Llama-3 (128k vocabulary) and 4k scored tokens, ~2 GB of fp32 logits
and as much again for their gradient become ~0.5 GB per 1024 tokens.

:func:`lm_head_logps_at` runs it as the LM head inside the model's own forward: under FSDP2
the head's weight is all-gathered only there (by the root module's hooks), and the same hooks
reduce-scatter its gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight, bias).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad[s:s + ctx.chunk].float()
            # d logp[target] / d logits = onehot(target) - softmax(logits)
            gl = torch.exp(F.linear(h, weight, bias).float() - lse[s:s + ctx.chunk, None]).mul_(-g[:, None])
            gl.scatter_add_(-1, targets[s:s + ctx.chunk, None], g[:, None])
            gl = gl.to(hidden.dtype)  # as the full path: the fp32 logits' gradient cast to the compute dtype
            if need_h:
                gh[s:s + ctx.chunk] = gl @ weight
            if need_w:
                gw += (gl.t() @ h).float()
            if need_b:
                gb += gl.float().sum(0)
        return gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype), None, None


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[target] per token, ``chunk`` tokens at a time.

    Same values and gradients as :func:`hhdpo.training.loss.token_logps` on the full logits:
    the projection in the inputs' dtype, the log-softmax in fp32.

    Args:
        hidden: (N, H) hidden states at the scored positions.
        weight: (V, H) the LM head's weight; bias: (V,) or None.
        targets: (N,) token ids.
        chunk: tokens per chunk, >= 1.
    Returns:
        (N,) float32 log-probabilities.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk)


@contextlib.contextmanager
def lm_head_logps_at(model, positions: torch.Tensor, targets: torch.Tensor, chunk: int):
    """Within this block, ``model``'s LM head returns the (N,) log-probs of ``targets`` at ``positions``
    (a (B, T) bool mask, N True; row-major order) instead of logits, by :func:`chunked_token_logps`.

    Yields a dict whose ``"logps"`` is the head's output once the model ran: the model's returned
    ``logits`` must be that very tensor. A model that transforms its head's output (logit
    soft-capping such as Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``,
    Granite's ``logits_scaling``) returns another one: :func:`check_head_output` refuses it.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}'s LM head is a {type(head).__name__}, not a Linear; "
                           "set dpo_training.logits_chunk_tokens: 0")
    seen: dict = {}

    def forward(hidden):
        seen["logps"] = chunked_token_logps(hidden[positions], head.weight, head.bias, targets, chunk)
        return seen["logps"]

    before = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield seen
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def check_head_output(model, logits, seen: dict) -> torch.Tensor:
    """``logits`` as returned by ``model`` under :func:`lm_head_logps_at`, if they are the head's own log-probs."""
    if logits is not seen.get("logps"):
        raise RuntimeError(f"{type(model).__name__} transforms its LM head's output (logit soft-capping or scaling); "
                           "the chunked LM head cannot be used with it: set dpo_training.logits_chunk_tokens: 0")
    return logits
