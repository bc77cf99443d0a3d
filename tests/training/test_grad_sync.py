"""Gradient accumulation under FSDP2: every micro-batch reduce-scatters by default (a rank never
holds the whole unsharded gradient); ``dpo_training.defer_grad_sync: true`` syncs only on the
last one. Both train on the same gradients and losses."""

from __future__ import annotations

import pytest
import torch

from hhdpo.core.io import read_jsonl
from tests.conftest import run_cli
from tests.training.test_model_loading import _init, _spawn
from tests.training.test_train import CFG, base_overrides

MICRO = 4


def _worker(rank, world, port, model_dir, out):
    import torch.distributed as dist

    from hhdpo.core.config import Config
    from hhdpo.training.optim import set_grad_sync
    from hhdpo.training.runtime import build_model

    _init(rank, world, port)
    res = {}
    for defer in (False, True):
        torch.manual_seed(0)
        model, _, _ = build_model(Config(), str(model_dir), True, torch.device("cpu"), torch.float32, world, True)
        after_first = None
        for i in range(MICRO):
            set_grad_sync(model, i, MICRO, defer)
            ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(10 * rank + i))
            (model(input_ids=ids).logits.float().logsumexp(-1).mean() / MICRO).backward()
            if i == 0:  # which parameters hold a (sharded) gradient after the first micro-batch
                after_first = {n: p.grad is not None for n, p in model.named_parameters()}
        res[defer] = {"after_first": after_first,
                      "grads": {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}}
    torch.save(res, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_every_micro_batch_reduce_scatters_by_default_with_the_same_gradients(tmp_path, tiny_llama_dir):
    _spawn(_worker, tiny_llama_dir, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        # default: the first micro-batch's gradients are already reduce-scattered into the shards
        assert all(r[False]["after_first"].values())
        # deferred: nothing reduced yet; each rank keeps the unsharded gradients until the last one
        assert not any(r[True]["after_first"].values())
        assert r[False]["grads"].keys() == r[True]["grads"].keys()
        for n, g in r[False]["grads"].items():
            torch.testing.assert_close(g, r[True]["grads"][n], rtol=1e-5, atol=1e-7, msg=n)
            assert g.abs().sum() > 0, n


def test_training_with_and_without_deferred_sync_gives_the_same_losses(tmp_path, hh_file, tiny_llama_dir):
    """2 FSDP ranks, 4 micro-batches per step, 3 steps: the default and ``defer_grad_sync: true``
    log the same losses and gradient norms."""
    runs = {}
    for defer in ("false", "true"):
        save = tmp_path / f"defer-{defer}"
        r = run_cli("train", "--config", CFG, "--nproc-per-node", 2,
                    *base_overrides(hh_file, save, **{"dpo_training.max_steps": 3,
                                                      "dpo_training.gradient_accumulation_steps": MICRO,
                                                      "dpo_training.learning_rate": 1e-3,
                                                      "dpo_training.defer_grad_sync": defer}),
                    f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[defer] = [m for m in read_jsonl(save / "metrics.jsonl") if "loss" in m]
    a, b = runs["false"], runs["true"]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    assert len({m["loss"] for m in a}) == 3  # the policy really moved
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-5), key
