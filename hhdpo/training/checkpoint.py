"""Training checkpoints (DCP shards that resume on any world size) and the Hugging Face export.

Layout under ``run_paths(cfg).ckpt``:

    step_0000010/             a complete checkpoint; meta.json is written last
        .metadata, *.distcp   model and optimizer shards (torch.distributed.checkpoint)
        trainer_state.pt      step, epoch, data position, scheduler, tail test, beta (rank 0)
        rng_rank<r>.pt        each rank's RNG states
        meta.json
    .step_0000012.partial/    a save in progress, or killed mid-way: never resumed from
    abandoned_<time>/         checkpoints set aside when a run resumed from an older one

Resuming explicitly from an older checkpoint starts a new branch: the checkpoints after it
belong to the abandoned one, so they are moved aside (never deleted) and neither
``resume: auto`` nor ``keep_last`` pruning sees them again. That happens once, when the named
checkpoint starts the run: later attempts of the run continue from its newest checkpoint
(:func:`find_resume_checkpoint`). With no checkpoint at all, the logs of an attempt that never
completed are set aside into ``<save_dir>/logs/attempt-<N>/`` and the run starts over
(:func:`starts_over`, :func:`set_aside_attempt`); a completed run is never overwritten.
Rank 0's parts of a save and of the export share their outcome with every rank
(``hhdpo.training.rank0``).
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hhdpo.core.config import Config, ConfigError, run_paths
from hhdpo.core.errors import BadInput
from hhdpo.core.io import atomic_write_json
from hhdpo.training import rank0

CKPT_PREFIX = "step_"
# files of an HF export that hold weights: any of them not written by the newest export is stale
_WEIGHT_FILE_RE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CKPT_PREFIX):])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints whose meta.json exists (written last), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir()
             if p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit() and (p / "meta.json").is_file()]
    return sorted(found, key=checkpoint_step)


def read_run_state(path: Path) -> dict:
    """``run_state.json`` (``run_paths(cfg).state``) as a dict; {} when absent or unreadable."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


# what run_state.json keeps from one attempt of a run to the next (each written only when it applies)
RUN_STATE_KEPT = ("resumed_from", "wandb_run_id")


def kept_run_state(path: Path) -> dict:
    """The fields of ``run_state.json`` that a later attempt of the same run keeps (:data:`RUN_STATE_KEPT`)."""
    state = read_run_state(path)
    return {k: state[k] for k in RUN_STATE_KEPT if k in state}


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint this attempt of the run starts from (None: from the base model).

    ``resume: auto``: this run's newest complete checkpoint. ``resume: <path>`` names the
    checkpoint that *starts* the run (it may lie in another run's directory); a later attempt
    of the same run (a requeue, the same command again, submitit's checkpoint) continues from
    this run's newest checkpoint instead of going back to it. ``run_state.json`` records the
    named checkpoint the run started from (``resumed_from``: its resolved path and step); naming
    another checkpoint starts a new branch again.
    """
    r = cfg.checkpoint.resume
    if r == "never":
        return None
    paths = run_paths(cfg)
    ckpts = complete_checkpoints(paths.ckpt)
    if r == "auto":
        return ckpts[-1] if ckpts else None
    p = Path(r).expanduser()
    origin = read_run_state(paths.state).get("resumed_from") or {}
    if ckpts and origin.get("path") == str(p.resolve()) and checkpoint_step(ckpts[-1]) >= origin.get("step", 0):
        return ckpts[-1]
    if not (p / "meta.json").is_file():
        raise ConfigError(f"checkpoint.resume: got {r!r}, expected auto, never or a complete checkpoint directory")
    return p


def run_leftovers(cfg: Config) -> list[Path]:
    """What an earlier run left in this run's place: metrics, an HF export, margins logs."""
    paths = run_paths(cfg)
    return [p for p in (paths.metrics, paths.save / "model.safetensors", paths.tail) if p.exists()]


# sections the training never reads: a rerun that changes only these finds the run already done
_NOT_TRAINING = ("HH_test", "vllm", "huggingface", "wandb", "judge", "eval", "slurm")


def completed_run(cfg: Config) -> int | None:
    """The step at which this very run completed, or None.

    A run counts as this one when ``run_state.json`` says completed, the export's weights are in
    save_dir and the config.yaml saved there equals ``cfg`` in every key the training reads
    (``checkpoint.resume`` aside: a named checkpoint only started the run; ``never`` asks for a
    fresh start, which :func:`starts_over` refuses). Rerunning the command
    of a finished run (``make demo`` again) then changes nothing: validating and exporting again
    would rewrite the weights, and every evaluation made from them would look stale.
    """
    import yaml

    from hhdpo.core.config import changed_keys, config_yaml

    paths = run_paths(cfg)
    state = read_run_state(paths.state)
    saved = paths.save / "config.yaml"
    if cfg.checkpoint.resume == "never" or state.get("status") != "completed" or not saved.is_file():
        return None
    if not any(_WEIGHT_FILE_RE.match(f.name) for f in paths.save.iterdir()):
        return None
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    new = yaml.safe_load(config_yaml(cfg))
    for d in (old, new):
        for k in _NOT_TRAINING:
            d.pop(k, None)
        if isinstance(d.get("checkpoint"), dict):
            d["checkpoint"].pop("resume", None)
    return None if changed_keys(old, new) else int(state.get("step", 0))


def starts_over(cfg: Config) -> bool:
    """With no checkpoint to resume: whether an earlier, unfinished attempt of this run left files.

    True when ``run_state.json`` says the run never completed (it was killed before its first
    checkpoint: a node failure, an OOM kill, SIGKILL): this attempt starts over and sets those
    files aside (:func:`set_aside_attempt`). Raises ConfigError when they belong to a completed
    run, or to one without a run state: that run is protected. False when there is nothing.
    """
    paths = run_paths(cfg)
    leftovers = run_leftovers(cfg)
    if not leftovers:
        return False
    status = read_run_state(paths.state).get("status")
    if status is not None and status != "completed":
        return True
    raise ConfigError(
        f"dpo_training.save_dir: {paths.save} already holds a run ({leftovers[0].name}) and no checkpoint "
        "to resume; choose another save_dir (nothing was changed)")


def set_aside_attempt(cfg: Config) -> Path | None:
    """Move an unfinished attempt's logs (metrics, margins, run state, W&B run id) into
    ``<save_dir>/logs/attempt-<N>/`` (N = 1, 2, ...), so that the new attempt logs each step once.
    Returns that folder (None when there was nothing to move). Rank 0 only."""
    paths = run_paths(cfg)
    moving = [p for p in (paths.metrics, paths.tail, paths.state, paths.save / ".wandb_run_id") if p.exists()]
    if not moving:
        return None
    logs = paths.save / "logs"
    n = 1 + max((int(p.name[8:]) for p in logs.glob("attempt-*") if p.name[8:].isdigit()), default=0)
    dest = logs / f"attempt-{n}"
    dest.mkdir(parents=True)
    for p in moving:
        shutil.move(str(p), str(dest / ("margins" if p == paths.tail else p.name)))
    return dest


def set_aside_later_checkpoints(ckpt_dir: Path, resumed: Path) -> tuple[Path | None, list[Path]]:
    """Move the checkpoints of ``ckpt_dir`` that do not lead to ``resumed`` into ``abandoned_<time>/``.

    Those are the ones after its step (and one at the same step that is another directory, when
    ``resumed`` lies elsewhere). Returns the folder they went to (None when nothing moved) and
    their original paths. Rank 0 only.
    """
    step, here = json.loads((resumed / "meta.json").read_text())["step"], resumed.resolve()
    later = [p for p in complete_checkpoints(ckpt_dir)
             if checkpoint_step(p) > step or (checkpoint_step(p) == step and p.resolve() != here)]
    if not later:
        return None, []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = ckpt_dir / f"abandoned_{stamp}", 1
    while dest.exists():
        dest, n = ckpt_dir / f"abandoned_{stamp}_{n}", n + 1
    dest.mkdir()
    for p in later:
        os.replace(p, dest / p.name)
    return dest, later


# ---------------------------------------------------------------------------- save / load


def _dcp_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _capture_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(root: Path, step: int, model, opt, trainer_state: dict, keep_last: int) -> Path:
    """Write ``step``'s checkpoint on every rank (collective); returns its directory.

    Written into a temporary directory, meta.json last, then renamed, so a killed job never
    leaves a checkpoint that looks complete. ``trainer_state`` (rank 0's) must hold ``epoch``
    and ``world``. Keeps the newest ``keep_last`` complete checkpoints.
    """
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".{final.name}.partial"

    def start():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed job
        tmp.mkdir(parents=True)

    def finish():
        torch.save(trainer_state, tmp / "trainer_state.pt")
        atomic_write_json(tmp / "meta.json", {"step": step, "epoch": trainer_state["epoch"],
                                              "world": trainer_state["world"], "time": time.time()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # rank 0's parts share their outcome (hhdpo.training.rank0): a failure there ends every rank
    rank0.on_rank0(f"creating the checkpoint directory {tmp}", start)
    dcp.save(_dcp_state(model, opt), checkpoint_id=str(tmp))
    with rank0.shared(f"saving the RNG states into {tmp}"):
        torch.save(_capture_rng(), tmp / f"rng_rank{rank}.pt")
    rank0.on_rank0(f"completing the checkpoint {final}", finish)
    return final


def _numpy_globals() -> list:
    """What numpy's RNG state (a uint32 key array) pickles as; allowed for ``torch.load(weights_only=True)``."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    # a file written under numpy 1.x names numpy.core.multiarray._reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


class CheckpointError(BadInput):
    """A checkpoint file hhdpo cannot trust or read (exit 2, like any bad input)."""


def load_state(path: Path):
    """A checkpoint's ``trainer_state.pt`` or ``rng_rank<r>.pt``, loaded with ``weights_only=True``: tensors,
    plain Python values and numpy arrays only; a pickle naming any other callable or class (code
    it would run) raises :class:`CheckpointError` (torch's own reason in its message) instead of running it."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and plain values, which "
                              f"hhdpo never writes (tampered with, or not hhdpo's); {reason}") from None


def load_checkpoint(path: Path, model, opt) -> dict:
    """Load model and optimizer shards (any world size) and, when the world size is the same,
    this rank's RNG states; returns the trainer state saved with them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    tr = load_state(path / "trainer_state.pt")
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if tr["world"] == dist.get_world_size() and rng_file.is_file():
        _restore_rng(load_state(rng_file))
    return tr


# ---------------------------------------------------------------------------- Hugging Face export


def export_hf(model, hf_config, arch: str, tokenizer, dtype: torch.dtype, save: Path, base_model: str) -> list[str]:
    """Gather the shards into a Hugging Face directory ``save`` (rank 0 writes; collective).

    Weights in ``dtype`` as safetensors (sharded above 5 GB), config, tokenizer and chat
    template, and the base model's ``generation_config.json`` (its sampling defaults and
    end-of-turn ids) when it has one. Weight files and index left by an earlier export that
    this one did not write are removed afterwards: a loader globbing ``*.safetensors`` would
    read both. Returns the weight files written (on every rank). A failure while rank 0 writes
    raises on every rank (``hhdpo.training.rank0``), not just on rank 0.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write() -> list[str]:
        nonlocal sd
        written: list[str] = []
        if getattr(hf_config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
        split = split_torch_state_dict_into_shards(sd, max_shard_size="5GB")
        for fname, keys in split.filename_to_tensors.items():
            tmp = save / f".{fname}.tmp"
            save_file({k: sd[k] for k in keys}, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, save / fname)
            written.append(fname)
        if split.is_sharded:
            atomic_write_json(save / "model.safetensors.index.json", {"metadata": {}, "weight_map": split.tensor_to_filename})
            written.append("model.safetensors.index.json")
        cfg = copy.deepcopy(hf_config)
        cfg.architectures = [arch]
        cfg.dtype = dtype
        cfg.use_cache = True
        cfg.save_pretrained(save)
        tokenizer.save_pretrained(save)
        _copy_generation_config(base_model, save)
        remove_stale_weights(save, set(written))
        return written

    # rank 0 writes while the others wait for its outcome: a failure ends every rank (hhdpo.training.rank0)
    return rank0.on_rank0(f"writing the Hugging Face export to {save}", write)


def remove_stale_weights(directory: Path, keep: set[str]) -> list[str]:
    """Delete the HF weight files and indexes in ``directory`` not named in ``keep``; returns their names."""
    stale = sorted(p.name for p in directory.iterdir() if p.is_file() and _WEIGHT_FILE_RE.match(p.name) and p.name not in keep)
    for name in stale:
        (directory / name).unlink()
    return stale


def base_generation_config(base_model: str) -> Path | None:
    """``generation_config.json`` of a local model directory, or of a Hub model in the local HF cache."""
    p = Path(base_model)
    if p.is_dir():
        f = p / "generation_config.json"
        return f if f.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(base_model, "generation_config.json")
    return Path(found) if isinstance(found, str) else None


def _copy_generation_config(base_model: str, save: Path) -> None:
    src, dst = base_generation_config(base_model), save / "generation_config.json"
    if src is None:
        dst.unlink(missing_ok=True)  # an earlier export's, from another base model
        return
    tmp = save / ".generation_config.json.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
