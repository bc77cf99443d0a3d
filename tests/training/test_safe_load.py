"""Checkpoint state loads with ``torch.load(weights_only=True)``: a real checkpoint's trainer state
and RNG states load (numpy's RNG key array allowed), a pickle naming anything else is refused
without running it, also when a resume meets one."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hhdpo.training.checkpoint import CheckpointError, load_state
from tests.conftest import run_cli
from tests.training.test_train import CFG, base_overrides


class _Payload:
    """What a tampered checkpoint could hold: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Thing:
    pass


def test_a_pickle_with_an_arbitrary_object_is_refused(tmp_path):
    marker = tmp_path / "ran"
    for i, obj in enumerate([_Payload(marker), _Thing(), {"step": 3, "extra": _Thing()}]):
        f = tmp_path / f"state{i}.pt"
        torch.save({"step": 3, "x": obj}, f)
        with pytest.raises(CheckpointError, match=f"{f}: refused to load.*Weights only load failed"):
            load_state(f)
    assert not marker.exists()
    # what a checkpoint does hold loads: tensors, plain values, numpy's RNG state
    f = tmp_path / "fine.pt"
    state = {"step": 3, "beta": 0.1, "window": {"loss": 1.5}, "t": torch.arange(3), "np": np.random.get_state(),
             "py": (3, tuple(range(625)), None)}
    torch.save(state, f)
    got = load_state(f)
    assert got["np"][0] == "MT19937" and np.array_equal(got["np"][1], state["np"][1]) and got["np"][1].dtype == np.uint32
    assert got["step"] == 3 and got["window"] == {"loss": 1.5} and torch.equal(got["t"], state["t"])


def test_resume_loads_real_checkpoint_state_and_refuses_a_tampered_one(tmp_path, hh_file, tiny_llama_dir):
    common = [f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", "dpo_training.lr_scheduler=constant"]
    save = tmp_path / "run"
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 2}), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = save / "checkpoints" / "step_0000002"
    tr, rng = load_state(ckpt / "trainer_state.pt"), load_state(ckpt / "rng_rank0.pt")
    assert tr["step"] == 2 and tr["world"] == 1 and "scheduler" in tr and "tail" in tr
    assert set(rng) >= {"python", "numpy", "torch"} and isinstance(rng["numpy"][1], np.ndarray)

    marker = tmp_path / "ran"
    genuine = {name: (ckpt / name).read_bytes() for name in ("trainer_state.pt", "rng_rank0.pt")}
    for name in genuine:
        state = load_state(ckpt / name)
        state["python" if name.startswith("rng") else "beta"] = _Payload(marker)
        torch.save(state, ckpt / name)
        with pytest.raises(CheckpointError, match=name):
            load_state(ckpt / name)
    # the resume itself refuses it (and runs nothing, writes no later checkpoint)
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 3}), *common)
    # bad input: exit 2 with the file named, no traceback
    assert r.returncode == 2 and "trainer_state.pt: refused to load" in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not marker.exists()
    assert not (save / "checkpoints" / "step_0000003").exists()
    for name, data in genuine.items():
        (ckpt / name).write_bytes(data)
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 3}), *common)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
