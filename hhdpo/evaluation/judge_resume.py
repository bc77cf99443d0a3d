"""The judge's files: which pairs to judge, where verdicts go, and which saved verdicts are current.

A saved verdict is current when its idx is still in the pairwise file and its ``judge_key``
(a hash of the pair's prompt, responses and ids, the judge model and template) matches the
pair's now. Files written before ``judge_key`` existed: the key is computed from the
record's own saved pair and judge fields, which are what the judge saw; records lacking
them are re-judged.

:func:`coverage` says how far a judged file covers its pairwise file (judged, errors, missing);
``hhdpo judge``/``eval``, ``hhdpo summarize`` and the judge stage's completion marker use it.

:func:`exclusive` keeps one judge per judged file: ``flock`` on ``.<name>.lock``, or, on a
filesystem without flock (Lustre mounted without ``flock``: ENOSYS/EOPNOTSUPP/ENOLCK), a lock
file ``.<name>.pidlock`` created with ``O_CREAT|O_EXCL`` holding the owner's pid and host. That one
survives a SIGKILL: a lock of a dead process on this host is taken over; one from another host
must be deleted by hand once no judge runs (the refusal names the file).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from hhdpo.core.io import DataError, iter_jsonl

DEFAULT_MODELS = ("policy", "base")


def judge_key(rec: dict, model, template) -> Optional[str]:
    """Hash of what a verdict depends on: the pair's prompt, responses and their ids (the
    model/chosen mapping), the judge model and template. None when the pair fields are missing."""
    fields = [rec.get(k) for k in ("prompt", "a", "b", "a_id", "b_id")]
    if not all(isinstance(f, str) for f in fields):
        return None
    blob = json.dumps([*fields, model, template], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_saved(saved: list[dict], pairs: list[dict], model: str, template: str,
                retry_errors: bool = False) -> tuple[list[dict], Counter]:
    """Saved verdicts still current for ``pairs``, and a count of the others by reason."""
    want = {p["idx"]: judge_key(p, model, template) for p in pairs}
    keep, dropped = [], Counter()
    for r in saved:
        # pre-judge_key files: the record itself holds the pair and judge it was judged with
        key = r.get("judge_key") or judge_key(r, r.get("judge_model"), r.get("judge_template"))
        if r.get("idx") not in want:
            dropped["no longer in the pairwise file"] += 1
        elif key is None:
            dropped["saved without the pair fields to check it"] += 1
        elif key != want[r["idx"]]:
            dropped["prompt or responses changed"] += 1
        elif retry_errors and request_failed(r):
            dropped["with judge_error"] += 1
        else:
            keep.append(r)
    return keep, dropped


def load_pairs(path) -> list[dict]:
    """Read a pairwise file; a bad line raises DataError naming file:line."""
    pairs, seen = [], {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("prompt", "a", "b"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{where}: {key!r} missing or not a string (is this a pairwise file?)")
        rec.setdefault("idx", lineno)
        rec.setdefault("a_id", "a")
        rec.setdefault("b_id", "b")
        if rec["idx"] in seen:
            raise DataError(f"{where}: duplicate idx {rec['idx']!r} (first at line {seen[rec['idx']]})")
        seen[rec["idx"]] = lineno
        pairs.append(rec)
    return pairs


# errno of flock on a filesystem that does not support it (e.g. Lustre mounted without -o flock)
NO_FLOCK_ERRNOS = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})


@contextlib.contextmanager
def exclusive(out_path: Path, log=None):
    """One judge per out_file: two writers (e.g. a requeued job while the old one still runs)
    would judge the same missing idx twice. flock is released by the kernel even on SIGKILL;
    where the filesystem has no flock, :func:`pid_lock` stands in (said once in ``log``)."""
    import fcntl

    out_path.parent.mkdir(parents=True, exist_ok=True)
    unsupported = None
    with open(out_path.with_name(f".{out_path.name}.lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{out_path}: another hhdpo judge is writing it (lock held); wait for it or "
                            "pick another --out_file") from None
        except OSError as e:
            if e.errno not in NO_FLOCK_ERRNOS:
                raise
            unsupported = e
        if unsupported is None:
            yield
            return
    with pid_lock(out_path, unsupported, log):
        yield


def _holder(path: Path) -> dict | None:
    try:
        h = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return h if isinstance(h, dict) and isinstance(h.get("pid"), int) and isinstance(h.get("host"), str) else None


def _dead_here(h: dict | None) -> bool:
    """True when ``h`` is a process of this host that no longer runs (its lock is stale)."""
    if h is None or h["host"] != socket.gethostname():
        return False
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def pid_lock(out_path: Path, why: OSError | None = None, log=None):
    """The lock of :func:`exclusive` without flock: ``.<name>.pidlock`` created with O_EXCL (atomic
    on Lustre and NFS too) holding ``{pid, host, since}``, removed on exit. A leftover of a dead
    process on this host is taken over; any other leftover is refused with the file to delete."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    path = out_path.with_name(f".{out_path.name}.pidlock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if why is not None:
        log(f"judge: {out_path.parent} has no flock ({errno.errorcode.get(why.errno, why.errno)}: {why.strerror}); "
            f"locking {out_path.name} with {path.name} instead (pid {me['pid']} on {me['host']})")
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            h = _holder(path)
            if attempt == 0 and _dead_here(h):
                log(f"judge: {path}: stale lock of pid {h['pid']} on {h['host']} (no such process); taking it over")
                path.unlink(missing_ok=True)
                continue
            who = (f"pid {h['pid']} on host {h['host']} since {h.get('since', '?')}" if h
                   else "unreadable: a judge starting right now, or a leftover")
            raise DataError(f"{out_path}: another hhdpo judge is writing it (lock file {path}: {who}); wait for it "
                            f"or pick another --out_file. If no judge runs any more (one killed with SIGKILL on "
                            f"another node leaves the lock file behind), delete {path} and rerun") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        break
    try:
        yield
    finally:
        if _holder(path) == me:  # never remove a lock another judge took over
            path.unlink(missing_ok=True)


def default_out_file(in_file) -> Path:
    """``x_pairwise.jsonl`` -> ``x_judged.jsonl``; otherwise ``<stem>_judged.jsonl``."""
    p = Path(in_file)
    name = p.name[:-6] if p.name.endswith(".jsonl") else p.stem
    name = name.replace("pairwise", "judged") if "pairwise" in name else name + "_judged"
    return p.with_name(name + ".jsonl")


def model_files(cfg, names) -> tuple[list[Path], list[Path]]:
    """The pairwise and judged files of models ``names`` in the eval directory, as ``hhdpo eval`` names them."""
    from hhdpo.core.config import run_paths

    d = run_paths(cfg).eval
    return [d / f"{n}_pairwise.jsonl" for n in names], [d / f"{n}_judged.jsonl" for n in names]


# --------------------------------------------------------------------------- completeness


def _current(rec: dict, pair: dict) -> bool:
    """``rec`` holds a verdict on ``pair`` as it is now (same prompt, responses and ids), by the
    judge model and template the record names."""
    model, template = rec.get("judge_model"), rec.get("judge_template")
    key = rec.get("judge_key") or judge_key(rec, model, template)
    return key is not None and key == judge_key(pair, model, template)


def request_failed(rec: dict) -> bool:
    """The judge never answered (a request that failed after all retries): a rerun can finish it.
    An answer that could not be read (``judge_raw`` kept) is a verdict: at temperature 0 asking
    again gives the same text, so it counts as ``invalid``, not as unfinished work."""
    return bool(rec.get("judge_error")) and "judge_raw" not in rec


def coverage(pairs: list[dict], records) -> dict:
    """How far judged ``records`` cover ``pairs`` (as :func:`load_pairs` returns them): per pair,
    its last record (the one summaries count) with a current verdict counts as ``judged``, or as
    one of the ``errors`` (the request failed: :func:`request_failed`), or as ``invalid`` (the
    judge answered without a usable winner); a pair without one is ``missing``. ``complete``: no
    pair missing and none with a failed request (invalid verdicts are reported, not re-asked)."""
    last = {}
    for r in records:
        last[r.get("idx")] = r
    c = {"pairs": len(pairs), "judged": 0, "errors": 0, "invalid": 0, "missing": 0}
    for p in pairs:
        r = last.get(p["idx"])
        if r is None or not _current(r, p):
            c["missing"] += 1
        elif request_failed(r):
            c["errors"] += 1
        elif r.get("judge_error") or r.get("winner_model_vs_chosen") not in ("model", "chosen", "tie"):
            c["invalid"] += 1
        else:
            c["judged"] += 1
    c["complete"] = c["errors"] == 0 and c["missing"] == 0
    return c


def file_coverage(pairwise_file, judged_file) -> dict:
    """:func:`coverage` of a judged file (none yet: every pair missing) over its pairwise file."""
    judged = Path(judged_file)
    records = [r for _, r in iter_jsonl(judged)] if judged.exists() else []
    return coverage(load_pairs(pairwise_file), records)


def describe_coverage(c: dict) -> str:
    """``12 of 20 pairs judged, 6 missing, 2 with errors`` (``, 1 invalid`` when the judge gave unreadable answers)."""
    invalid = f", {c['invalid']} invalid" if c.get("invalid") else ""
    return f"{c['judged']} of {c['pairs']} pairs judged, {c['missing']} missing, {c['errors']} with errors{invalid}"
