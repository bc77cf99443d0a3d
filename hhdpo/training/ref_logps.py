"""Reference log-probs computed once over every pair and cached on disk (``precompute_ref_log_probs``).

The frozen reference model then runs once before training instead of at every step, and is
freed. The cache key covers everything the values depend on: the token ids of every
prompt/chosen/rejected (so the tokenizer, chat template, truncation and data), the reference
weights (a local directory's fingerprint; a Hub model's snapshot commit) and model config, the
compute dtype and whether log-probs are length-averaged.

Rank 0 alone decides whether the cache holds them and sends the values to the other ranks:
with a node-local ``HHDPO_CACHE`` ranks see different files, and ranks that took different
branches would wait forever in different collectives. A cache that cannot be written (a
read-only image under Apptainer) costs a warning, never the run: the values are in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from hhdpo.core.fingerprint import ids_fingerprint, weights_fingerprint
from hhdpo.core.models import hub_snapshot

LogpsFn = Callable[[list[int]], "tuple[torch.Tensor, torch.Tensor]"]


def model_identity(ref_model: str) -> tuple[str, Path] | None:
    """What pins the weights of ``ref_model`` (a resolved model directory or Hub id), and its directory.

    A local directory: its weights' fingerprint. A Hub id: the commit of the snapshot that
    huggingface_hub's cache resolves it to (``hhdpo.core.models.hub_snapshot``), never the name,
    which stays the same when the repo moves on; None when the cache holds no snapshot of it yet.
    """
    p = Path(ref_model)
    if p.exists():
        return weights_fingerprint(p), p
    snap = hub_snapshot(ref_model)
    return None if snap is None else (f"hub:{ref_model}@{snap.name}", snap)


def ref_cache_key(examples: list[dict], ref_model: str, dtype: torch.dtype, average_log_prob: bool) -> str | None:
    """16 hex digits; ``ref_model`` is the resolved model directory (or Hub id). None for a Hub
    model with no local snapshot, whose commit is not known (nothing to look up or store under)."""
    identity = model_identity(ref_model)
    if identity is None:
        return None
    weights, directory = identity
    ids = ids_fingerprint(row for ex in examples for row in (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]))
    config = directory / "config.json"
    config_text = config.read_text() if config.is_file() else ""
    parts = [ids, len(examples), weights, config_text, str(dtype), bool(average_log_prob)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def cache_file(cache_root: Path, key: str) -> Path:
    return cache_root / "ref_logps" / f"{key}.pt"


def ref_cache_path(cache_root: Path, examples: list[dict], ref_model: str, dtype: torch.dtype,
                   average_log_prob: bool) -> Path | None:
    """The cache file for these pairs and reference (:func:`ref_cache_key`), or None when there is no key."""
    key = ref_cache_key(examples, ref_model, dtype, average_log_prob)
    return None if key is None else cache_file(cache_root, key)


def read_cache(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen, rejected) log-probs of ``n`` pairs, or None if absent or unreadable."""
    try:
        if not path.is_file():
            return None
        c, r = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a torn or foreign file, an unreadable cache: a miss, recomputed
        return None
    if c.shape != (n,) or r.shape != (n,):
        return None
    return c.float(), r.float()


def write_cache(path: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write atomically (a temp file, renamed); raises on failure, leaving no temp file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        torch.save((chosen, rejected), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def compute_all(n: int, batch_size: int, logps_of: LogpsFn, device: torch.device,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of pairs 0..n-1, each rank computing a contiguous slice.

    ``logps_of(idxs)`` runs the reference model on those pairs; every rank calls it the same
    number of times (a short last slice is padded with pair 0) so FSDP collectives stay in step.
    """
    from tqdm.auto import tqdm

    rank, world = dist.get_rank(), dist.get_world_size()
    chunk = math.ceil(n / world)
    mine = list(range(rank * chunk, min(n, (rank + 1) * chunk)))
    mine += [0] * (chunk - len(mine))
    out = torch.zeros(2, chunk, device=device)
    with torch.no_grad():
        for s in tqdm(range(0, chunk, batch_size), desc="ref log-probs", disable=not progress):
            idxs = mine[s:s + batch_size]
            c, r = logps_of(idxs)
            out[0, s:s + len(idxs)], out[1, s:s + len(idxs)] = c.float(), r.float()
    gathered = [torch.zeros_like(out) for _ in range(world)]
    dist.all_gather(gathered, out)
    return torch.cat([g[0] for g in gathered])[:n].cpu(), torch.cat([g[1] for g in gathered])[:n].cpu()


def cached_or_computed(path: Path | None | Callable[[], Path | None], n: int,
                       compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                       device: torch.device, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's cache file when it has one (sent to every rank), else ``compute()`` on all ranks
    and rank 0 writes the cache. Collective: call on every rank.

    ``path``: the cache file, None (no cache), or a function giving either, which rank 0 calls
    before looking and again before writing (``compute()`` may have downloaded a Hub model whose
    snapshot commit keys the file only then). A failed write is a warning: the other ranks have
    gone on already, and every rank returns the computed values.
    """
    rank0 = dist.get_rank() == 0
    where = (path() if callable(path) else path) if rank0 else None
    cached = read_cache(where, n) if where is not None else None
    hit = torch.tensor([cached is not None], dtype=torch.int32, device=device)
    dist.broadcast(hit, src=0)
    if hit.item():
        buf = torch.stack(cached).to(device) if rank0 else torch.empty(2, n, device=device)
        dist.broadcast(buf, src=0)
        if rank0:
            log(f"[train] reference log-probs from cache {path}")
        return buf[0].cpu(), buf[1].cpu()
    chosen, rejected = compute()
    if rank0:
        _store(path, chosen, rejected, log)
    return chosen, rejected


def _store(path, chosen: torch.Tensor, rejected: torch.Tensor, log) -> None:
    """Rank 0 after computing: write the cache, or say why not; never raises."""
    try:
        where = path() if callable(path) else path
        if where is None:
            log("[train] warning: reference log-probs not cached: the reference is a Hub model with no "
                "snapshot in the local Hugging Face cache to pin it by")
            return
        write_cache(where, chosen, rejected)
    except Exception as e:  # noqa: BLE001 - a read-only HHDPO_CACHE (Apptainer image), a full disk, ...
        log(f"[train] warning: reference log-probs not cached ({type(e).__name__}: {e}); "
            "training goes on with them in memory (set HHDPO_CACHE to a writable directory to keep them)")
        return
    log(f"[train] reference log-probs cached in {where}")
