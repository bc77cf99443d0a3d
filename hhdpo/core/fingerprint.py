"""Cheap fingerprints that change when a model's weights or tokenization change.

Used as resume and cache keys (generation outputs, reference log-probs), so that output
computed from old weights is never silently reused after more training into the same
directory. Hashing 16 GB of Llama weights on every resume would cost minutes, so a weight
file is identified by its name, size, modification time (ns) and safetensors header (tensor
names, dtypes, shapes and offsets); every export rewrites the files, which changes the time.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return b""
        (n,) = struct.unpack("<Q", raw)
        return f.read(min(n, 100_000_000))


def weights_fingerprint(model_path: str | Path) -> str:
    """16 hex digits over the weight files of a model directory (or one weight file).

    A Hub id or anything that is not a local path fingerprints as its own name: the Hub's
    revision pins it, and nothing local can change it.
    """
    p = Path(model_path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    else:
        return hashlib.sha256(f"hub:{model_path}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(json.dumps([f.name, st.st_size, st.st_mtime_ns]).encode())
        if f.suffix == ".safetensors":
            h.update(_safetensors_header(f))
    return h.hexdigest()[:16]


def ids_fingerprint(rows) -> str:
    """16 hex digits over a sequence of token-id lists (order matters)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(struct.pack(f"<I{len(row)}q", len(row), *row))
    return h.hexdigest()[:16]
