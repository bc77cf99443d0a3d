"""``hhdpo pairwise``: turn generation outputs into A/B pairs against the HH chosen response.

Input: one record per line from ``hhdpo generate`` (``idx``, ``prompt``, ``response``,
``HH_response``, ``model_id``, ...). Output, one per line, in the seed's format::

    {"idx", "prompt", "a", "b", "a_id", "b_id", "is_swapped", "shuffle_seed"}

Unshuffled, ``a`` is the model's response and ``b`` the HH chosen one. With
``shuffle_ab`` each pair is swapped or not by a hash of ``(seed, idx)`` rather than a
sequential RNG, so a pair's order does not depend on which other records are in the file
(reruns, subsets and resumes agree). The judge maps verdicts back via ``a_id``/``b_id``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from hhdpo.io import DataError, atomic_write_text, iter_jsonl

CHOSEN_ID = "hh_chosen"
REQUIRED_KEYS = ("prompt", "response", "HH_response")


def swap_for(seed: int, idx) -> bool:
    """Deterministic fair coin for one pair: True = put the HH chosen response in slot A."""
    digest = hashlib.sha256(f"hhdpo-pairwise:{seed}:{idx}".encode()).digest()
    return bool(digest[0] & 1)


def make_pair(ex: dict, idx, *, shuffle_ab: bool = False, seed: int = 0,
              a_id: str | None = None, b_id: str | None = None) -> dict:
    """Build one pairwise record from one generation record (pure; no validation)."""
    model_id = a_id or str(ex.get("model_id") or "model")
    chosen_id = b_id or CHOSEN_ID
    a, b, ida, idb = ex["response"], ex["HH_response"], model_id, chosen_id
    swapped = bool(shuffle_ab and swap_for(seed, idx))
    if swapped:
        a, b, ida, idb = b, a, idb, ida
    return {"idx": idx, "prompt": ex["prompt"], "a": a, "b": b, "a_id": ida, "b_id": idb,
            "is_swapped": swapped, "shuffle_seed": seed}


def make_pairwise(in_file, out_file, shuffle_ab: bool = False, seed: int = 0,
                  a_id: str | None = None, b_id: str | None = None, keep_meta: bool = False) -> dict:
    """Write the pairwise file for one generation file atomically; return counts.

    Raises :class:`DataError` naming ``file:line`` for a malformed line, a missing or
    non-string field, a duplicate ``idx`` (the judge resumes by idx) or a model id that
    equals the chosen id (verdicts could not be mapped back).
    """
    in_path = Path(in_file)
    out, seen = [], {}
    for lineno, ex in iter_jsonl(in_path):
        where = f"{in_path}:{lineno}"
        for key in REQUIRED_KEYS:
            if key not in ex:
                raise DataError(f"{where}: missing key {key!r} (keys: {', '.join(ex)})")
            if not isinstance(ex[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(ex[key]).__name__}")
        idx = ex.get("idx", len(out))  # the seed's fallback: position in the file
        if isinstance(idx, bool) or not isinstance(idx, (int, str)):
            raise DataError(f"{where}: 'idx' must be an integer or string, got {idx!r}")
        if idx in seen:
            raise DataError(f"{where}: duplicate idx {idx!r} (first at line {seen[idx]})")
        seen[idx] = lineno
        rec = make_pair(ex, idx, shuffle_ab=shuffle_ab, seed=seed, a_id=a_id, b_id=b_id)
        if rec["a_id"] == rec["b_id"]:
            raise DataError(f"{where}: model id and chosen id are both {rec['a_id']!r}; pass --a_id/--b_id")
        if keep_meta:
            rec.update({k: v for k, v in ex.items() if k not in rec})
        out.append(rec)
    atomic_write_text(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    n_swapped = sum(r["is_swapped"] for r in out)
    return {"in_file": str(in_path), "out_file": str(out_file), "n": len(out), "swapped": n_swapped,
            "shuffle_ab": shuffle_ab, "seed": seed}


def build_parser(defaults=None) -> argparse.ArgumentParser:
    ev = defaults  # an EvalConfig, or None for the seed's defaults
    p = argparse.ArgumentParser(
        prog="hhdpo pairwise",
        description="Build an A/B pairwise JSONL (model response vs HH chosen) from a generation JSONL.")
    p.add_argument("--config", help="YAML config; eval.shuffle_ab / eval.seed become the defaults")
    p.add_argument("--in_file", required=True, help="generation JSONL for ONE model (policy or base)")
    p.add_argument("--out_file", required=True, help="pairwise JSONL to write (atomically)")
    p.add_argument("--shuffle_ab", action=argparse.BooleanOptionalAction,
                   default=ev.shuffle_ab if ev else False,
                   help="swap A/B per pair with p=0.5, deterministically from (seed, idx) "
                        "(default: eval.shuffle_ab with --config, else off)")
    p.add_argument("--seed", type=int, default=ev.seed if ev else 0,
                   help="seed for the A/B swap (default: eval.seed with --config, else 0)")
    p.add_argument("--a_id", default=None, help="label of the model side (default: each record's model_id)")
    p.add_argument("--b_id", default=None, help=f"label of the HH chosen side (default: {CHOSEN_ID})")
    p.add_argument("--keep_meta", action="store_true", help="copy the generation record's other fields too")
    return p


def cli(argv: list[str]) -> int:
    from hhdpo.config import ConfigError, load_config

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    try:
        ev = load_config(known.config).eval if known.config else None
    except ConfigError as e:
        print(f"hhdpo pairwise: {e}", file=sys.stderr)
        return 2
    args = build_parser(ev).parse_args(argv)
    try:
        stats = make_pairwise(args.in_file, args.out_file, shuffle_ab=args.shuffle_ab, seed=args.seed,
                              a_id=args.a_id, b_id=args.b_id, keep_meta=args.keep_meta)
    except DataError as e:
        print(f"hhdpo pairwise: {e}", file=sys.stderr)
        return 1
    n = stats["n"]
    print(f"[OK] wrote {n} pairs -> {stats['out_file']} | swapped={stats['swapped']} "
          f"({stats['swapped'] / max(1, n):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
