"""Checkpoint branches and the Hugging Face export, through real (tiny-model) training runs on HH pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hhdpo.core.io import read_jsonl
from hhdpo.training.checkpoint import complete_checkpoints, set_aside_later_checkpoints
from hhdpo.training.metrics import EVAL_KEYS, TRAIN_KEYS
from tests.conftest import run_cli
from tests.training.test_train import CFG, base_overrides


def _tiny(model_dir) -> list[str]:
    return [f"policy_model={model_dir}", f"ref_model={model_dir}", "dpo_training.lr_scheduler=constant",
            "dpo_training.group_by_length=false"]


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, hh_file, tiny_llama_dir):
    """Explicit resume from step 2 of 4: steps 3 and 4 belong to an abandoned branch, so they are
    moved aside (not deleted); a later ``resume: auto`` continues the new branch, not the old one."""
    save = tmp_path / "run"
    common = [*_tiny(tiny_llama_dir), "checkpoint.save_steps=1", "checkpoint.keep_last=3", "dataset.val_ratio=0.1",
              "dpo_training.eval_steps=2"]
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 4}), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = save / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000003", "step_0000004"]

    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 3}), *common,
                f"checkpoint.resume={ckpts / 'step_0000002'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "abandoned branch" in r.stdout, r.stdout[-3000:]
    (aside,) = [p for p in ckpts.iterdir() if p.name.startswith("abandoned_")]
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000003", "step_0000004"]
    assert all((p / "meta.json").is_file() for p in aside.iterdir())  # moved whole, not deleted
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_0000002", "step_0000003"]

    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 4}), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpts / 'step_0000003'}" in r.stdout, r.stdout[-3000:]
    records = read_jsonl(save / "metrics.jsonl")
    assert [m["step"] for m in records if "loss" in m] == [1, 2, 3, 4]
    # every record is a training or a validation record, with exactly the documented keys
    assert {tuple(m) for m in records} == {TRAIN_KEYS, EVAL_KEYS}


def test_export_replaces_an_earlier_export_and_keeps_the_generation_config(tmp_path, hh_file, tiny_llama_dir):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    gen = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.85}
    (base / "generation_config.json").write_text(json.dumps(gen))
    save = tmp_path / "run"
    save.mkdir()
    # an earlier, sharded export into the same directory
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    for name in stale:
        (save / name).write_text("earlier export")
    (save / "notes.txt").write_text("not a weight file")

    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 1}), *_tiny(base))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [n for n in stale if (save / n).exists()]
    assert (save / "model.safetensors").is_file() and (save / "notes.txt").read_text() == "not a weight file"
    assert json.loads((save / "generation_config.json").read_text()) == gen

    from transformers import AutoModelForCausalLM, GenerationConfig

    assert GenerationConfig.from_pretrained(save).temperature == 0.6
    model = AutoModelForCausalLM.from_pretrained(save)
    assert model.generation_config.eos_token_id == [2, 7]


def test_only_checkpoints_off_the_resumed_branch_are_set_aside(tmp_path):
    """Resuming a checkpoint from elsewhere (renamed ``best``, step 3): this run's steps 3 and 4 are
    another branch; step 2 and a partial save are left alone; resuming the newest moves nothing."""
    def checkpoint(d: Path, step: int) -> Path:
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step}))
        return d

    ckpts = tmp_path / "checkpoints"
    for step in (2, 3, 4):
        checkpoint(ckpts / f"step_{step:07d}", step)
    (ckpts / ".step_0000005.partial").mkdir()
    dest, moved = set_aside_later_checkpoints(ckpts, checkpoint(tmp_path / "elsewhere" / "best", 3))
    assert [p.name for p in moved] == ["step_0000003", "step_0000004"]
    assert dest.parent == ckpts and dest.name.startswith("abandoned_")
    assert [p.name for p in complete_checkpoints(dest)] == ["step_0000003", "step_0000004"]
    assert complete_checkpoints(ckpts) == [ckpts / "step_0000002"] and (ckpts / ".step_0000005.partial").is_dir()
    assert set_aside_later_checkpoints(ckpts, ckpts / "step_0000002") == (None, [])
