"""The token cache: each rank tokenizes its share once, every rank reads all shares, a later attempt
tokenizes nothing; a stale, partial or unwritable cache is never silently used."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from hhdpo.core.config import DatasetConfig
from hhdpo.core.fingerprint import ids_fingerprint
from hhdpo.core.models import load_tokenizer
from hhdpo.data.hh import load_pairs, tokenize_pairs
from hhdpo.training import token_cache as tc

DS = DatasetConfig(max_len=256, max_prompt_len=128)
N = 101  # pairs from the real file's first 102 records (one is skipped): shares of 51 and 50 on two ranks
SPLIT = "test[:102]"


@pytest.fixture(scope="module")
def pairs(hh_file):
    out = load_pairs(str(hh_file), SPLIT, log=None)[0]
    assert len(out) == N
    return out


@pytest.fixture(scope="module")
def toks():
    return [load_tokenizer("smollm2") for _ in range(3)]  # one per simulated rank (threads)


@pytest.fixture(scope="module")
def want(pairs, toks):
    return tokenize_pairs(pairs, toks[0], DS)


@pytest.fixture
def calls(monkeypatch):
    """(thread name, number of pairs) of every tokenize_pairs call the cache makes."""
    seen = []

    def counting(ps, tok, ds, progress=False):
        seen.append((threading.current_thread().name, len(ps)))
        return tokenize_pairs(ps, tok, ds, progress=progress)

    monkeypatch.setattr(tc, "tokenize_pairs", counting)
    return seen


class Threads:
    """``world`` ranks as threads; all_true and exchange meet at a barrier like the collectives."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world, timeout=300)

    def _gather(self, rank, value):
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def comm(self, rank: int) -> tc.Comm:
        def exchange(what, err):
            errs = self._gather(rank, err)
            if err is not None:
                raise err
            if any(e is not None for e in errs):
                raise RuntimeError(f"another rank failed while {what}")

        return tc.Comm(rank, self.world, lambda flag: all(self._gather(rank, bool(flag))), exchange)

    def run(self, fn) -> list:
        """``fn(rank, comm, logs)`` on every rank at once; returns [(result or exception, logs)] by rank."""
        out = [None] * self.world

        def one(r):
            logs = []
            try:
                out[r] = (fn(r, self.comm(r), logs.append), logs)
            except Exception as e:  # noqa: BLE001 - returned to the test
                out[r] = (e, logs)

        threads = [threading.Thread(target=one, args=(r,), name=f"rank{r}") for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        return out


def _ranks(world, pairs, toks, root, ds=DS):
    return Threads(world).run(lambda r, comm, log: tc.tokenized_pairs(pairs, toks[r], ds, root, comm=comm, log=log))


def _mtimes(root: Path) -> dict:
    return {f.name: f.stat().st_mtime_ns for f in root.rglob("*.npz")}


def test_one_process_writes_then_reuses(tmp_path, pairs, toks, want, calls):
    logs = []
    assert tc.tokenized_pairs(pairs, toks[0], DS, tmp_path, log=logs.append) == want
    (cache,) = tmp_path.iterdir()
    assert [f.name for f in cache.iterdir()] == ["part-0-of-1.npz"] and calls == [("MainThread", N)]
    assert logs[-1] == f"[data] tokens: {N} pairs, cache {cache} (written, part 0 of 1)"
    before = _mtimes(tmp_path)
    assert tc.tokenized_pairs(pairs, toks[0], DS, tmp_path, log=logs.append) == want
    assert calls == [("MainThread", N)] and _mtimes(tmp_path) == before  # the rerun tokenized nothing
    assert logs[-1] == f"[data] tokens: {N} pairs, cache {cache} (reused, 1 part)"


def test_two_ranks_split_the_work_and_a_requeue_reuses_it(tmp_path, pairs, toks, want, calls):
    first = _ranks(2, pairs, toks, tmp_path)
    assert [res for res, _ in first] == [want, want]
    assert sorted(calls) == [("rank0", 51), ("rank1", 50)]  # each its share, nothing twice
    (cache,) = tmp_path.iterdir()
    assert sorted(f.name for f in cache.iterdir()) == ["part-0-of-2.npz", "part-1-of-2.npz"]
    assert first[1][1][-1] == f"[data] tokens: {N} pairs, cache {cache} (written, part 1 of 2)"
    before = _mtimes(tmp_path)
    calls.clear()
    again = _ranks(2, pairs, toks, tmp_path)
    assert [res for res, _ in again] == [want, want] and calls == [] and _mtimes(tmp_path) == before
    assert all(logs[-1].endswith("(reused, 2 parts)") for _, logs in again)
    # a requeue on another number of ranks reads the same complete set
    assert _ranks(3, pairs, toks, tmp_path)[2][0] == want and calls == [] and _mtimes(tmp_path) == before


def test_a_missing_part_is_tokenized_again_and_the_others_kept(tmp_path, pairs, toks, want, calls):
    _ranks(2, pairs, toks, tmp_path)
    (cache,) = tmp_path.iterdir()
    (cache / "part-1-of-2.npz").unlink()  # an attempt killed before rank 1 wrote
    kept = (cache / "part-0-of-2.npz").stat().st_mtime_ns
    calls.clear()
    out = _ranks(2, pairs, toks, tmp_path)
    assert [res for res, _ in out] == [want, want]
    assert calls == [("rank1", 50)] and (cache / "part-0-of-2.npz").stat().st_mtime_ns == kept
    assert out[0][1][-1].endswith("(kept from an earlier attempt, part 0 of 2)")


def test_torn_or_foreign_parts_are_not_read(tmp_path, pairs, toks, want, calls):
    logs = []
    tc.tokenized_pairs(pairs, toks[0], DS, tmp_path, log=logs.append)
    (cache,) = tmp_path.iterdir()
    part = cache / "part-0-of-1.npz"
    good = part.read_bytes()
    key = cache.name.removeprefix("tokens-")
    assert tc.read_part(part, key, N, 0, 1) == want
    assert tc.read_part(part, "0" * 16, N, 0, 1) is None  # another key inside
    assert tc.read_part(part, key, N + 1, 0, 1) is None  # another number of pairs
    part.write_bytes(good[: len(good) // 2])  # torn
    assert tc.read_part(part, key, N, 0, 1) is None
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # a flipped bit in the ids: the zip's CRC
    part.write_bytes(bytes(flipped))
    assert tc.read_part(part, key, N, 0, 1) is None
    calls.clear()
    assert tc.tokenized_pairs(pairs, toks[0], DS, tmp_path, log=logs.append) == want and calls == [("MainThread", N)]
    assert part.read_bytes() != bytes(flipped) and tc.read_part(part, key, N, 0, 1) == want


def test_the_key_follows_everything_the_ids_depend_on(pairs, toks, tmp_path):
    tok = toks[0]
    key = tc.token_cache_key(pairs, tok, DS)
    assert tc.token_cache_key(pairs, toks[1], DatasetConfig(max_len=256, max_prompt_len=128)) == key
    assert tc.token_cache_key(pairs, tok, DatasetConfig(max_len=256)) == key  # max_prompt_len default: 256 // 2
    others = [
        tc.token_cache_key(pairs, tok, DatasetConfig(max_len=512, max_prompt_len=128)),
        tc.token_cache_key(pairs, tok, DatasetConfig(max_len=256, max_prompt_len=100)),
        tc.token_cache_key(pairs, tok, DatasetConfig(max_len=256, max_prompt_len=128, use_chat_template=False)),
        tc.token_cache_key(pairs[:-1], tok, DS),
        tc.token_cache_key(pairs[1:] + pairs[:1], tok, DS),
    ]
    edited = list(pairs)
    edited[7] = type(pairs[7])(**{**vars(pairs[7]), "chosen": pairs[7].chosen + "!"})
    others.append(tc.token_cache_key(edited, tok, DS))
    retemplated = load_tokenizer("smollm2")
    retemplated.chat_template = tok.chat_template.replace("SmolLM", "SmolLM2")
    others.append(tc.token_cache_key(pairs, retemplated, DS))
    assert len({key, *others}) == len(others) + 1


def test_a_changed_setting_reads_no_stale_cache(tmp_path, pairs, toks, want, calls):
    tc.tokenized_pairs(pairs, toks[0], DS, tmp_path, log=lambda _: None)
    longer = DatasetConfig(max_len=512, max_prompt_len=128)
    calls.clear()
    assert tc.tokenized_pairs(pairs, toks[0], longer, tmp_path, log=lambda _: None) == tokenize_pairs(pairs, toks[0], longer)
    assert calls == [("MainThread", N)] and len(list(tmp_path.iterdir())) == 2


def test_a_read_only_cache_falls_back_to_memory_with_a_warning(tmp_path, pairs, toks, want, calls, monkeypatch):
    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(tc, "atomic_write_bytes", read_only)
    out = _ranks(2, pairs, toks, tmp_path)
    assert [res for res, _ in out] == [want, want] and not list(tmp_path.rglob("*.npz"))
    for rank, (_, logs) in enumerate(out):
        assert "not written (OSError: [Errno 30] Read-only file system" in logs[0]
        assert "1 of 2 parts missing or unreadable" in logs[1]
        assert logs[2].endswith(f"(not written, part {rank} of 2)")
    assert sorted(calls) == [("rank0", 50), ("rank0", 51), ("rank1", 50), ("rank1", 51)]  # each: everything


def test_a_cache_root_that_cannot_be_made_falls_back(tmp_path, pairs, toks, want):
    (tmp_path / "file").write_text("a file, not a directory")
    logs = []
    assert tc.tokenized_pairs(pairs, toks[0], DS, tmp_path / "file" / "cache", log=logs.append) == want
    assert "not written" in logs[0] and logs[-1].endswith("(not written, part 0 of 1)")


# ----------------------------------------------------------------------------- two real gloo ranks


def _gloo_rank(rank: int, world: int, root: str, hh: str, out: str) -> None:
    import torch.distributed as dist

    from hhdpo.core.errors import BadInput
    from hhdpo.core.io import DataError
    from hhdpo.training import rank0

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    rank0.setup()
    tok = load_tokenizer("smollm2")
    pairs = load_pairs(hh, SPLIT, log=None)[0]
    seen = []
    real = tc.tokenize_pairs

    def counting(ps, t, ds, progress=False):
        seen.append(len(ps))
        if ds.max_len == 64 and rank == 1:
            raise DataError("bad pair on rank 1")
        return real(ps, t, ds, progress=progress)

    tc.tokenize_pairs = counting
    logs = []
    runs = [ids_fingerprint(row for ex in tc.tokenized_pairs(pairs, tok, DS, f"{root}/cache", log=logs.append)
                            for row in ex.values()) for _ in range(2)]
    try:
        tc.tokenized_pairs(pairs, tok, DatasetConfig(max_len=64, max_prompt_len=40), f"{root}/cache", log=logs.append)
        failed = None
    except BadInput as e:
        failed = [type(e).__name__, str(e)]
    Path(out).write_text(json.dumps({"runs": runs, "calls": seen, "logs": logs, "failed": failed}))
    dist.destroy_process_group()


def test_two_gloo_ranks(tmp_path, hh_file, want):
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_gloo_rank, args=(r, 2, str(tmp_path), str(hh_file), str(outs[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0]
    res = [json.loads(o.read_text()) for o in outs]
    expected = ids_fingerprint(row for ex in want for row in ex.values())
    assert [r["runs"] for r in res] == [[expected, expected]] * 2  # both attempts, both ranks: the same ids
    # first attempt: each rank its share; second: nothing; third: 51 pairs on rank 0, rank 1 fails
    assert res[0]["calls"] == [51, 51] and res[1]["calls"] == [50, 50]
    assert res[0]["logs"][1].endswith("(reused, 2 parts)") and "(written, part 1 of 2)" in res[1]["logs"][0]
    assert res[1]["failed"] == ["DataError", "bad pair on rank 1"]
    assert res[0]["failed"][0] == "RankBadInput" and "bad pair on rank 1" in res[0]["failed"][1]
