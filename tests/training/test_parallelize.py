"""How build_model runs the decoder layers (hhdpo.training.parallelize): full and selective
activation checkpointing compute what no checkpointing computes; a compiled FSDP2 policy and
reference compute one DPO step as the eager ones do; what stays gathered after forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.training.test_model_loading import _init


def _cfg(**dpo):
    from hhdpo.core.config import Config

    cfg = Config()
    for k, v in dpo.items():
        setattr(cfg.dpo_training, k, v)
    return cfg


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (4, 20), generator=g)  # chosen rows 0-1, rejected rows 2-3
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[3, :7] = 0  # left padding
    scored = mask.clone()
    scored[:, :10] = 0  # the "prompt"
    return ids, mask, scored


def _dpo_loss(policy, ref, beta=0.1):
    """One DPO sigmoid loss on a fixed batch: summed response log-probs of policy and reference."""
    from hhdpo.training.loss import preference_loss, token_logps

    ids, mask, scored = _batch()

    def logps(model):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        return (token_logps(logits, ids[:, 1:]) * scored[:, 1:]).sum(-1)

    pol = logps(policy)
    with torch.no_grad():
        rf = logps(ref)
    losses, _, _ = preference_loss(pol[:2], pol[2:], rf[:2], rf[2:], beta)
    return losses.mean()


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def test_full_and_selective_checkpointing_give_the_gradients_of_none(tiny_llama_dir):
    """fp32, unsharded: the same loss and gradients; full recomputes each layer's matmuls in
    backward, selective keeps their outputs and recomputes none of them."""
    from hhdpo.training.runtime import build_model

    cpu = torch.device("cpu")
    ref, _, _ = build_model(_cfg(), str(tiny_llama_dir), False, cpu, torch.float32, 1, False)
    got = {}
    for mode in ("none", "full", "selective"):
        cfg = _cfg(activation_checkpointing=mode != "none", ac_mode="full" if mode == "none" else mode)
        policy, _, _ = build_model(cfg, str(tiny_llama_dir), True, cpu, torch.float32, 1, False)
        loss = _dpo_loss(policy, ref, beta=5.0)  # a large beta: policy = reference still has gradients
        with _CountMatmuls() as mm:
            loss.backward()
        got[mode] = (loss.detach(), {n: p.grad for n, p in policy.named_parameters()}, mm.n)
    loss, grads, mm_none = got["none"]
    assert mm_none > 0 and any(g.abs().sum() > 0 for g in grads.values())
    for mode in ("full", "selective"):
        torch.testing.assert_close(got[mode][0], loss, rtol=0, atol=0)
        for n, g in grads.items():
            torch.testing.assert_close(got[mode][1][n], g, rtol=1e-6, atol=1e-8, msg=n)
    # full recomputes 6 of each layer's 7 projections (down_proj's output is needed by no gradient:
    # the recompute stops before it); selective recomputes none
    assert got["full"][2] == mm_none + 2 * 6
    assert got["selective"][2] == mm_none


def test_ac_mode_is_validated():
    from hhdpo.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="ac_mode"):
        load_config(None, ["dpo_training.ac_mode=some"])


def _worker(rank, world, port, model_dir, out):
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch.distributed.tensor import DTensor

    from hhdpo.training.runtime import build_model

    _init(rank, world, port)
    cpu, res = torch.device("cpu"), {}
    for compiled in (False, True):
        # the seed's stack: FSDP2 (fp32 on one rank), selective checkpointing, compiled layers
        cfg = _cfg(activation_checkpointing=True, ac_mode="selective", compile=compiled)
        policy, _, _ = build_model(cfg, str(model_dir), True, cpu, torch.float32, world, True)
        ref, _, _ = build_model(cfg, str(model_dir), False, cpu, torch.float32, world, True)
        with torch.no_grad():  # move the policy off the reference: a loss that is not ln 2
            for p in policy.parameters():
                local = p.to_local()  # the whole tensor on one rank
                local.add_(torch.randn(local.shape, generator=torch.Generator().manual_seed(local.numel())) * 1e-2)
        loss = _dpo_loss(policy, ref)

        def gathered(model):  # after forward, before backward: which units still hold full parameters
            return [not isinstance(m.self_attn.q_proj.weight, DTensor) for m in model.model.layers] + \
                [not isinstance(model.lm_head.weight, DTensor)]

        res[compiled] = {"loss": loss.item(), "policy_gathered": gathered(policy), "ref_gathered": gathered(ref)}
        loss.backward()
        res[compiled]["grads"] = {n: p.grad.full_tensor().clone() for n, p in policy.named_parameters()}
        res[compiled]["compiled"] = all(getattr(m, "_compiled_call_impl", None) is not None
                                        for m in [*policy.model.layers, *ref.model.layers])
        res[compiled]["graphs"] = counters["stats"]["unique_graphs"]  # dynamo really captured the layers
    torch.save(res, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_compiled_fsdp_layers_train_as_eager_ones(tmp_path, tiny_llama_dir):
    """One DPO step, compiled (inductor on CPU) vs eager, on a 1-rank FSDP2 mesh: the same loss
    and gradients. After forward the policy keeps its last layer and root gathered (backward
    starts there), the frozen reference keeps nothing gathered."""
    import torch.multiprocessing as mp

    from hhdpo.evaluation.serve import free_port

    mp.spawn(_worker, args=(1, free_port(), tiny_llama_dir, tmp_path), nprocs=1, join=True)
    res = torch.load(tmp_path / "rank0.pt")
    eager, comp = res[False], res[True]
    assert comp["compiled"] and not eager["compiled"]
    # policy train and reference no-grad graphs, shared by the layers
    assert eager["graphs"] == 0 and comp["graphs"] >= 2
    assert abs(eager["loss"] - 0.6931) > 1e-3  # the policy really differs from the reference
    assert comp["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    for n, g in eager["grads"].items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(comp["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    for r in (eager, comp):
        assert r["policy_gathered"] == [False, True, True]  # layers 0, 1 (the last), root (LM head)
        assert r["ref_gathered"] == [False, False, False]
