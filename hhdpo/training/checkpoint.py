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
``resume: auto`` nor ``keep_last`` pruning sees them again.
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
from hhdpo.core.io import atomic_write_json

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


def find_resume_checkpoint(cfg: Config) -> Path | None:
    r = cfg.checkpoint.resume
    if r == "never":
        return None
    if r == "auto":
        ckpts = complete_checkpoints(run_paths(cfg).ckpt)
        return ckpts[-1] if ckpts else None
    p = Path(r)
    if not (p / "meta.json").is_file():
        raise ConfigError(f"checkpoint.resume: got {r!r}, expected auto, never or a complete checkpoint directory")
    return p


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
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed job
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_dcp_state(model, opt), checkpoint_id=str(tmp))
    torch.save(_capture_rng(), tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
        atomic_write_json(tmp / "meta.json", {"step": step, "epoch": trainer_state["epoch"],
                                              "world": trainer_state["world"], "time": time.time()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, opt) -> dict:
    """Load model and optimizer shards (any world size) and, when the world size is the same,
    this rank's RNG states; returns the trainer state saved with them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    tr = torch.load(path / "trainer_state.pt", weights_only=False)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if tr["world"] == dist.get_world_size() and rng_file.is_file():
        _restore_rng(torch.load(rng_file, weights_only=False))
    return tr


# ---------------------------------------------------------------------------- Hugging Face export


def export_hf(model, hf_config, arch: str, tokenizer, dtype: torch.dtype, save: Path, base_model: str) -> list[str]:
    """Gather the shards into a Hugging Face directory ``save`` (rank 0 writes; collective).

    Weights in ``dtype`` as safetensors (sharded above 5 GB), config, tokenizer and chat
    template, and the base model's ``generation_config.json`` (its sampling defaults and
    end-of-turn ids) when it has one. Weight files and index left by an earlier export that
    this one did not write are removed afterwards: a loader globbing ``*.safetensors`` would
    read both. Returns the weight files written (rank 0; [] elsewhere).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    written: list[str] = []
    if dist.get_rank() == 0:
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
    dist.barrier()
    return written


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
