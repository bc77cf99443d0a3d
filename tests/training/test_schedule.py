"""The run's schedule (hhdpo.training.schedule): arithmetic for the shipped Llama config, warnings,
and the one line every training run prints at its start. Expected values are worked by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from hhdpo.core.config import load_config
from hhdpo.core.io import DataError
from hhdpo.training.schedule import schedule, schedule_line, schedule_warnings
from tests.conftest import run_cli

LLAMA = Path(__file__).parents[2] / "configs" / "llama31_8b.yaml"
# Anthropic/hh-rlhf train: harmless-base + helpful-base + helpful-online + helpful-rejection-sampled
HH_TRAIN = 42_537 + 43_835 + 22_007 + 52_421  # = 160,800


def test_shipped_llama_config_on_4_nodes_x_8_gpus_trains_past_its_warmup():
    s = schedule(HH_TRAIN, 32, load_config(LLAMA))
    # val_ratio 0.02: 3,216 val, 157,584 train; per rank 157,584 // 32 = 4,924 pairs -> 2,462 micro-batches
    # of 2 -> 1,231 steps of 2 accumulated micro-batches; global batch 32 x 2 x 2 = 128
    assert (s.val_pairs, s.train_pairs) == (3_216, 157_584)
    assert (s.global_batch, s.steps_per_epoch, s.total_steps, s.warmup_steps) == (128, 1_231, 1_231, 100)
    assert s.warmup_steps <= s.total_steps / 10
    # eval_steps = save_steps = 250: steps 250, 500, 750, 1000, then the final 1,231
    assert (s.validations, s.checkpoints) == (5, 5)
    assert schedule_warnings(s) == []
    # one validation: 3,216 // 32 = 100 per rank, whole batches of 2 -> 100 x 32 pairs
    assert s.val_pairs_scored == 3_200


def test_shipped_llama_config_on_one_node_x_8_gpus():
    s = schedule(HH_TRAIN, 8, load_config(LLAMA))
    # 157,584 // 8 = 19,698 -> 9,849 micro-batches -> 4,924 steps; global batch 8 x 2 x 2 = 32
    assert (s.global_batch, s.steps_per_epoch, s.total_steps) == (32, 4_924, 4_924)
    # validations at 250 ... 4,750 (19) + final; checkpoints the same (4,924 is no multiple of 250)
    assert (s.validations, s.checkpoints) == (20, 20)
    assert schedule_warnings(s) == []


def test_the_seed_schedule_is_29_steps_inside_its_warmup():
    """The issue's numbers: train[:10%] of 160,800 on 32 GPUs at 2 x 8 accumulation."""
    cfg = load_config(LLAMA, ["dataset.val_ratio=0.05", "dpo_training.gradient_accumulation_steps=8",
                              "dpo_training.eval_steps=200", "checkpoint.save_steps=200"])
    s = schedule(16_080, 32, cfg)
    # 804 val, 15,276 train; 15,276 // 32 = 477 -> 238 micro-batches -> 29 steps
    assert (s.train_pairs, s.total_steps, s.validations, s.checkpoints) == (15_276, 29, 1, 1)
    warnings = schedule_warnings(s)
    assert len(warnings) == 4
    assert "warmup_steps=100 reaches the run's 29 steps" in warnings[0]
    assert "tail test never starts" in warnings[1]
    assert "eval_steps=200" in warnings[2] and "save_steps=200" in warnings[3]


def _small(**kw):
    # 100 pairs, no validation split, 2 ranks x 2 pairs x 1 -> 100 // 2 // 2 = 25 steps
    o = {"dataset.val_ratio": 0, "dpo_training.batch_size": 2, "dpo_training.gradient_accumulation_steps": 1, **kw}
    return schedule(100, 2, load_config(None, [f"{k}={v}" for k, v in o.items()]))


@pytest.mark.parametrize("overrides, needles", [
    ({"dpo_training.warmup_steps": 25}, ["warmup_steps=25 reaches the run's 25 steps", "tail test never starts"]),
    ({"dpo_training.warmup_steps": 24}, []),
    ({"dpo_training.warmup_steps": 30, "tail_test.enabled": False}, ["warmup_steps=30"]),
    ({"dpo_training.warmup_steps": 5, "tail_test.warmup_steps": 25}, ["tail test's warm-up (25 steps"]),
    ({"dpo_training.max_steps": 10, "dpo_training.warmup_steps": 10}, ["reaches the run's 10 steps", "tail test"]),
    ({"checkpoint.save_steps": 26}, ["save_steps=26 is not below the run's 25 steps"]),
    ({"checkpoint.save_steps": 24}, []),
])
def test_warnings(overrides, needles):
    warnings = schedule_warnings(_small(**overrides))
    assert len(warnings) == len(needles), warnings
    for w, needle in zip(warnings, needles):
        assert needle in w, (needle, w)


def test_eval_steps_warning_needs_a_validation_split():
    # 100 pairs, val_ratio 0.1: 10 val, 90 train -> 90 // 2 // 2 = 22 steps; 10 val pairs make batches on 2 ranks
    s = _small(**{"dataset.val_ratio": 0.1, "dpo_training.eval_steps": 22})
    assert s.total_steps == 22 and s.validations == 1
    assert [w for w in schedule_warnings(s) if "eval_steps=22 is not below the run's 22 steps" in w]
    # eval every 5: 5, 10, 15, 20 and the final one
    assert _small(**{"dataset.val_ratio": 0.1, "dpo_training.eval_steps": 5}).validations == 5
    assert _small(**{"dpo_training.eval_steps": 5}).validations == 0  # no validation split at all


def test_too_few_pairs_is_bad_input():
    with pytest.raises(DataError, match="3 training pairs are too few for 2 ranks"):
        schedule(3, 2, load_config(None, ["dataset.val_ratio=0"]))


def test_schedule_line_says_everything_in_one_line():
    line = schedule_line(schedule(HH_TRAIN, 32, load_config(LLAMA)))
    assert "\n" not in line
    for part in ("160,800 pairs (157,584 train, 3,216 val)", "global batch 128 = 32 ranks x 2 x 2 accumulation",
                 "1,231 steps/epoch", "1,231 total steps (1 epoch)", "warmup 100 (8.1%)",
                 "5 validations (every 250 + final)", "5 checkpoints (every 250 + final)"):
        assert part in line, (part, line)


def test_every_training_run_prints_its_schedule_at_the_start(tmp_path, hh_file, tiny_llama_dir):
    r = run_cli("train", "--config", "configs/smollm2_cpu.yaml", f"policy_model={tiny_llama_dir}",
                f"ref_model={tiny_llama_dir}", f"dataset.dataset_name={hh_file}", "dataset.subset=test[:40]",
                "dataset.val_ratio=0.1", "dataset.max_len=64", "dataset.max_prompt_len=40", "dpo_training.batch_size=2",
                "dpo_training.gradient_accumulation_steps=1", "dpo_training.max_steps=2", "dpo_training.warmup_steps=5",
                "dpo_training.eval_steps=0", "checkpoint.save_steps=0", "dpo_training.log_steps=1",
                f"run_dir={tmp_path}", "dpo_training.save_dir=run", timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # 40 records, none skipped in the first 40: 4 val, 36 train -> 18 micro-batches of 2 -> 18 steps/epoch; max_steps 2
    lines = [ln for ln in r.stdout.splitlines() if "[train] schedule:" in ln]
    assert len(lines) == 1, r.stdout[-3000:]
    assert "40 pairs (36 train, 4 val)" in lines[0] and "18 steps/epoch, 2 total steps" in lines[0], lines[0]
    assert "global batch 2 = 1 ranks x 2 x 1 accumulation" in lines[0] and "warmup 5" in lines[0]
    assert r.stdout.count("[train] warning: dpo_training.warmup_steps=5 reaches the run's 2 steps") == 1
