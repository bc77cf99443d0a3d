"""Tokenized pairs, split across ranks on a run's first attempt and reused by its later ones.

At the seed's scale (HH-RLHF train, 160,800 pairs, 32 ranks) every rank used to tokenize every
pair on every attempt, the start and each SLURM requeue: ~13 minutes before the first step.
Now each rank tokenizes its share and writes it to the run's cache; every rank reads all shares,
and a requeue that finds the whole set tokenizes nothing.

Layout: ``<save_dir>/cache/tokens-<key>/part-<r>-of-<w>.npz``, written by rank r of w: pairs r,
r+w, r+2w, ... as int32 ids and their (prompt, chosen, rejected) lengths, with the key and
(r, w, number of pairs) inside; written whole (temp file, fsync, rename) and read with
``numpy.load(allow_pickle=False)``. The key (:func:`token_cache_key`) covers everything the ids
depend on: the pairs' text, the code that parses and tokenizes them (``hhdpo/data/hh.py``), the
tokenizer (its full serialization and files, the chat template, the transformers/tokenizers/
jinja2 versions), max_len, the effective max_prompt_len and use_chat_template. Another key is
another directory, so a stale cache is never read; a part that is missing, torn or foreign is
tokenized again.

Protocol (:func:`tokenized_pairs`, collective, every rank in the same order):

1. each rank loads a complete set of parts (written by any number of ranks) if there is one;
   when every rank could (an all_reduce of the flag), that is the result: ``reused``;
2. else each rank tokenizes ``pairs[rank::world]`` (or keeps its own valid part from an
   earlier attempt) and writes its part; a failure to tokenize on any rank ends every rank
   (:func:`hhdpo.training.rank0.exchange`, which is also the barrier before anyone reads);
   a failed write (read-only directory, full disk) is a warning;
3. each rank reads every other part; one it cannot read (its rank could not write it) it
   tokenizes itself, so a cache nobody can write means every rank tokenizes every pair in
   memory, as before. No collective follows step 2: ranks that take different ways here wait
   for nobody.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hhdpo.core.io import atomic_write_bytes
from hhdpo.data import hh
from hhdpo.data.hh import Pair, tokenize_pairs
from hhdpo.training import rank0

FORMAT = 1  # of the part files; part of the key
_PART_RE = re.compile(r"^part-(\d+)-of-(\d+)\.npz$")
_ROWS = ("prompt_ids", "chosen_ids", "rejected_ids")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


# --------------------------------------------------------------------------- key


def pairs_fingerprint(pairs: list[Pair]) -> str:
    """32 hex digits over the pairs' raw prompt/chosen/rejected text, in order (messages come from
    these by hh.py's parser, whose source is in the key too)."""
    h = hashlib.blake2b(digest_size=16)
    for s in range(0, len(pairs), 4096):
        chunk = pairs[s:s + 4096]
        h.update(np.array([len(x) for p in chunk for x in (p.prompt, p.chosen, p.rejected)], dtype=np.int64).tobytes())
        h.update("\0".join(x for p in chunk for x in (p.prompt, p.chosen, p.rejected)).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """32 hex digits over what makes a tokenizer's ids: its full serialization (a fast tokenizer) or
    vocabulary, its chat template, special tokens, the library versions, and its local files."""
    import jinja2
    import tokenizers
    import transformers

    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.bos_token_id,
                         sorted(tokenizer.get_added_vocab().items()), getattr(tokenizer, "clean_up_tokenization_spaces", None),
                         transformers.__version__, tokenizers.__version__, jinja2.__version__], default=str).encode())
    where = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if where.is_dir():
        for name in _TOKENIZER_FILES:
            f = where / name
            if f.is_file():
                h.update(name.encode() + b"\0" + hashlib.blake2b(f.read_bytes(), digest_size=16).digest())
    return h.hexdigest()


def token_cache_key(pairs: list[Pair], tokenizer, ds) -> str:
    """16 hex digits: pairs, parsing/tokenizing code, tokenizer, max_len, max_prompt_len, use_chat_template."""
    code = hashlib.blake2b(Path(hh.__file__).read_bytes(), digest_size=16).hexdigest()
    parts = [FORMAT, len(pairs), pairs_fingerprint(pairs), code, tokenizer_fingerprint(tokenizer),
             int(ds.max_len), int(ds.max_prompt_len or ds.max_len // 2), bool(ds.use_chat_template)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- part files


def part_path(cache: Path, rank: int, world: int) -> Path:
    return cache / f"part-{rank}-of-{world}.npz"


def write_part(path: Path, key: str, n: int, rank: int, world: int, examples: list[dict]) -> None:
    """Rank ``rank``'s share of ``n`` pairs, written whole; raises when it cannot be written."""
    lens = np.array([[len(ex[k]) for k in _ROWS] for ex in examples], dtype=np.int64).reshape(-1, 3)
    ids = np.fromiter((i for ex in examples for k in _ROWS for i in ex[k]), dtype=np.int64, count=int(lens.sum()))
    if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
        raise ValueError("token ids outside int32")
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), meta=np.array([FORMAT, rank, world, n], dtype=np.int64),
             lens=lens.astype(np.int32), ids=ids.astype(np.int32))
    atomic_write_bytes(path, buf.getvalue())


def read_part(path: Path, key: str, n: int, rank: int, world: int) -> list[dict] | None:
    """The pairs of a part file, or None when it is missing, unreadable, torn or of another key or split."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key or z["meta"].tolist() != [FORMAT, rank, world, n]:
                return None
            lens, ids = z["lens"], z["ids"]
    except Exception:  # noqa: BLE001 - missing, torn (zip CRC), foreign: tokenized again
        return None
    if lens.shape != (len(range(rank, n, world)), 3) or (lens.size and lens.min() < 0) or ids.shape != (int(lens.sum()),):
        return None
    flat, out, o = ids.tolist(), [], 0
    for a, b, c in lens.tolist():
        out.append({"prompt_ids": flat[o:o + a], "chosen_ids": flat[o + a:o + a + b], "rejected_ids": flat[o + a + b:o + a + b + c]})
        o += a + b + c
    return out


def load_complete(cache: Path, key: str, n: int, world: int) -> tuple[list[dict], int] | None:
    """All ``n`` pairs from a complete set of parts (this world's first, then any other's), and its size."""
    try:
        found = {int(m[2]) for f in cache.iterdir() if (m := _PART_RE.match(f.name))} if cache.is_dir() else set()
    except OSError:
        return None
    for w in sorted(found, key=lambda w: (w != world, w)):
        out: list = [None] * n
        for r in range(w):
            part = read_part(part_path(cache, r, w), key, n, r, w)
            if part is None:
                break
            out[r::w] = part
        else:
            return out, w
    return None


# --------------------------------------------------------------------------- protocol


@dataclass
class Comm:
    """How ranks agree: ``all_true(flag)`` (every rank's flag, AND) and ``exchange(what, err)``
    (raises on every rank when any rank's ``err`` is set). Both are collectives and barriers."""

    rank: int
    world: int
    all_true: Callable[[bool], bool]
    exchange: Callable[[str, BaseException | None], object]


def dist_comm(device: torch.device | str = "cpu") -> Comm:
    """Over torch.distributed when it is initialized (``device``: where the backend's tensors live),
    else one rank of one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        def solo_exchange(_what, err):
            if err is not None:
                raise err
        return Comm(0, 1, lambda flag: bool(flag), solo_exchange)

    def all_true(flag: bool) -> bool:
        t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    return Comm(dist.get_rank(), dist.get_world_size(), all_true, rank0.exchange)


def tokenized_pairs(pairs: list[Pair], tokenizer, ds, cache_root: str | Path, device: torch.device | str = "cpu",
                    comm: Comm | None = None, log=print, progress: bool = False) -> list[dict]:
    """:func:`hhdpo.data.hh.tokenize_pairs` of ``pairs`` (the same ids), through the cache under
    ``cache_root``; collective: every rank calls it with the same pairs (module docstring)."""
    comm = comm or dist_comm(device)
    n, rank, world = len(pairs), comm.rank, comm.world
    key = token_cache_key(pairs, tokenizer, ds)
    cache = Path(cache_root) / f"tokens-{key}"
    found = load_complete(cache, key, n, world)
    if comm.all_true(found is not None):
        log(f"[data] tokens: {n} pairs, cache {cache} (reused, {found[1]} part{'s' if found[1] > 1 else ''})")
        return found[0]

    mine, err, how = None, None, "written"
    try:
        mine = read_part(part_path(cache, rank, world), key, n, rank, world)
        if mine is not None:
            how = "kept from an earlier attempt"
        else:
            mine = tokenize_pairs(pairs[rank::world], tokenizer, ds, progress=progress)
            try:
                write_part(part_path(cache, rank, world), key, n, rank, world, mine)
            except Exception as e:  # noqa: BLE001 - read-only run dir, full disk, ...: the ids are in memory
                how = "not written"
                log(f"[data] warning: token cache {cache} not written ({type(e).__name__}: {e}); the pairs are "
                    "tokenized in memory instead (each rank tokenizes every part it cannot read)")
    except Exception as e:  # noqa: BLE001 - shared with every rank, raised again here
        err = e
    comm.exchange("tokenizing pairs", err)

    out: list = [None] * n
    out[rank::world] = mine
    redone = []
    for r in range(world):
        if r != rank:
            part = read_part(part_path(cache, r, world), key, n, r, world)
            if part is None:
                redone.append(r)
                part = tokenize_pairs(pairs[r::world], tokenizer, ds, progress=progress)
            out[r::world] = part
    if redone:
        log(f"[data] warning: token cache {cache}: {len(redone)} of {world} parts missing or unreadable "
            f"(their ranks could not write them); tokenized them here")
    log(f"[data] tokens: {n} pairs, cache {cache} ({how}, part {rank} of {world})")
    return out
