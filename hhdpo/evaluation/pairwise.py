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

import hashlib
import json
import sys
from pathlib import Path

from hhdpo.core.io import DataError, atomic_write_text, iter_jsonl

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


def pairwise_run(cfg, names: list[str], log=print) -> dict[str, Path]:
    """The stage as ``hhdpo eval`` runs it: each model's generations -> ``<eval dir>/<name>_pairwise.jsonl``."""
    from hhdpo.core.config import run_paths

    paths = run_paths(cfg)
    out = {}
    for name in names:
        out[name] = paths.eval / f"{name}_pairwise.jsonl"
        stats = make_pairwise(paths.gen_out(name), out[name], shuffle_ab=cfg.eval.shuffle_ab, seed=cfg.eval.seed,
                              a_id=name)
        log(f"[pairwise] {name}: {stats['n']} pairs, {stats['swapped']} swapped -> {out[name]}")
    return out


def cli(argv: list[str]) -> int:
    from hhdpo.core.stage import StageParser, load_stage_config, run_stage

    p = StageParser(
        "hhdpo pairwise", "Build A/B pairwise JSONL files (model response vs HH chosen) from generation files.\n\n"
        "  hhdpo pairwise --config run/config.yaml [--models policy,base]   # <eval dir>/<name>_pairwise.jsonl\n"
        "  hhdpo pairwise --in_file gen.jsonl --out_file pw.jsonl --shuffle_ab   # one file, the seed's flags",
        config_required=False, config_help="YAML config: eval.shuffle_ab / eval.seed and the run's paths")
    p.flag("models", default=None, metavar="NAMES", help="comma-separated model names (default: policy,base)")
    p.flag("in_file", default=None, help="generation JSONL for ONE model (instead of the config's files)")
    p.flag("out_file", default=None, help="pairwise JSONL to write (atomically); needs --in_file")
    p.key_flag("shuffle_ab", "eval.shuffle_ab", boolean=True,
               help="swap A/B per pair with p=0.5, deterministically from (seed, idx); off without --config, "
                    "as in the seed")
    p.key_flag("seed", "eval.seed", help="seed for the A/B swap")
    p.flag("a_id", default=None, help="label of the model side (default: each record's model_id)")
    p.flag("b_id", default=None, help=f"label of the HH chosen side (default: {CHOSEN_ID})")
    p.flag("keep_meta", action="store_true", help="copy the generation record's other fields too")
    args = p.parse(argv)
    if args.config is None:  # the seed's pairwise did not shuffle unless asked
        args.overrides.insert(0, "eval.shuffle_ab=false")
    if (args.in_file is None) != (args.out_file is None):
        p.error("--in_file and --out_file go together")
    if args.in_file is None and args.config is None:
        p.error("give --config (the run's files) or --in_file/--out_file")

    def body() -> None:
        cfg = load_stage_config(args)
        if args.in_file is None:
            names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else ["policy", "base"]
            pairwise_run(cfg, names)
            return
        stats = make_pairwise(args.in_file, args.out_file, shuffle_ab=cfg.eval.shuffle_ab, seed=cfg.eval.seed,
                              a_id=args.a_id, b_id=args.b_id, keep_meta=args.keep_meta)
        n = stats["n"]
        print(f"[OK] wrote {n} pairs -> {stats['out_file']} | swapped={stats['swapped']} "
              f"({stats['swapped'] / max(1, n):.1%})")

    return run_stage("hhdpo pairwise", body)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
