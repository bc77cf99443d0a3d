"""Token-budget micro-batches (``dpo_training.max_tokens_per_micro_batch``) train exactly like
fixed ones: the same loss per step, the same gradients and parameters, on 2 FSDP ranks whose
pairs need different numbers of forwards, and the same validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hhdpo.core.config import ConfigError, load_config
from hhdpo.core.io import read_jsonl
from hhdpo.data.batching import rank_batches
from hhdpo.data.hh import train_val_split
from hhdpo.data.token_budget import first_fit
from hhdpo.training.schedule import schedule, schedule_line
from tests.conftest import run_cli
from tests.training.test_train import CFG, base_overrides

BUDGET = 160  # tokens; these HH pairs hold 49-95 at max_len 64 with the prompt once: one to three per forward
B, GA, STEPS, VAL = 2, 2, 3, 0.25


def _train(tmp_path, hh_file, model_dir, name, **kw):
    save = tmp_path / name
    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2,
                *base_overrides(hh_file, save, **{"dpo_training.max_steps": STEPS, "dpo_training.batch_size": B,
                                                  "dpo_training.gradient_accumulation_steps": GA,
                                                  "dpo_training.learning_rate": 1e-3, "dataset.val_ratio": VAL, **kw}),
                f"policy_model={model_dir}", f"ref_model={model_dir}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return save, r.stdout


def _pair_tokens(save) -> list[int]:
    """Each pair's tokens as the run forwards them, from its own token cache: shared-prompt rows (the CPU
    default) hold the prompt once."""
    parts = sorted(save.glob("cache/tokens-*/part-*-of-*.npz"))
    world = int(parts[0].stem.split("-of-")[1])
    n = int(np.load(parts[0])["meta"][3])
    out = [0] * n
    for r in range(world):
        lens = np.load(next(p for p in parts if p.stem == f"part-{r}-of-{world}"))["lens"]
        out[r::world] = [p + c + j for p, c, j in lens.tolist()]
    return out


def test_token_budget_trains_like_fixed_micro_batches_on_uneven_ranks(tmp_path, hh_file, tiny_llama_dir):
    fixed, _ = _train(tmp_path, hh_file, tiny_llama_dir, "fixed")
    budget, out = _train(tmp_path, hh_file, tiny_llama_dir, "budget", **{"dpo_training.max_tokens_per_micro_batch": BUDGET})
    assert f"micro-batches of <= {BUDGET} real tokens" in out

    # the scenario: the ranks' pairs of a step need different numbers of forwards, and not GA of them
    # (a pair over the budget is a unit test's: at max_len 64 no pair holds more than 95 tokens)
    tokens = _pair_tokens(budget)
    train_idx, _ = train_val_split(len(tokens), VAL, 42)
    dealt = [rank_batches(len(train_idx), B, r, 2, 0, 42) for r in range(2)]
    shares = [[[tokens[train_idx[i]] for b in d[s * GA:(s + 1) * GA] for i in b] for d in dealt] for s in range(STEPS)]
    needs = [[len(first_fit(share, BUDGET)) for share in step] for step in shares]
    assert any(a != b for a, b in needs), needs
    assert any(n != GA for step in needs for n in step), needs

    ev_a, ev_b = ([m for m in read_jsonl(s / "metrics.jsonl") if "eval/loss" in m] for s in (fixed, budget))
    assert len(ev_a) == len(ev_b) == 1 and ev_a[0]["eval/n"] == ev_b[0]["eval/n"] > 0  # the final validation
    # rewards are beta x differences of fp32 summed log-probs of a few hundred (rounding ~3e-5, as the margins below)
    assert ev_b[0] == pytest.approx(ev_a[0], rel=1e-5, abs=1e-5)
    a, b = ([m for m in read_jsonl(s / "metrics.jsonl") if "loss" in m] for s in (fixed, budget))
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    assert len({m["loss"] for m in a}) == STEPS  # the policy really moved
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/accuracies", "beta"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-5), key
    # every step's global margins, in the dealt pair order; each is a difference of summed log-probs of a
    # few hundred, whose fp32 rounding (~3e-5) changes with the forward's padded width
    for s in range(1, STEPS + 1):
        rel = f"logs/margins/epoch_000/step_{s:05d}.npy"
        np.testing.assert_allclose(np.load(budget / rel), np.load(fixed / rel), rtol=1e-5, atol=1e-4)
    # the parameters after the last step; AdamW divides by sqrt(v) + eps, which magnifies the fp32 noise of a
    # near-zero gradient (seen: 1.1e-5 in one of 8,192 with shared-prompt rows): atol is 5% of one step's update
    # at lr 1e-3, where a pair dropped or counted twice moves most parameters by a whole update
    from safetensors.torch import load_file

    pa, pb = load_file(fixed / "model.safetensors"), load_file(budget / "model.safetensors")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=5e-5, msg=k)


def test_the_schedule_line_names_the_budget_and_negative_budgets_are_refused():
    cfg = load_config(None, ["dpo_training.max_tokens_per_micro_batch=4096"])
    line = schedule_line(schedule(100, 2, cfg))
    # 100 pairs: 95 train, 95 // 2 ranks // 4 = 11 steps
    assert "global batch 8 = 2 ranks x 4 x 1 accumulation, micro-batches of <= 4,096 real tokens, 11 steps/epoch" in line
    assert "real tokens" not in schedule_line(schedule(100, 2, load_config(None, [])))
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        load_config(None, ["dpo_training.max_tokens_per_micro_batch=-1"])
