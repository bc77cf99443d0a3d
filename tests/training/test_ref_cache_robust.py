"""The reference log-prob cache pins a Hub model by its snapshot's commit (offline, from
huggingface_hub's cache layout), and a cache that cannot be written costs a warning, never the
run, on every rank."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from hhdpo.core.models import hub_snapshot
from hhdpo.training.ref_logps import cached_or_computed, ref_cache_key
from tests.training.test_ref_logps import _precompute, _torchrun
from tests.training.test_train import CFG, _losses, base_overrides

COMMIT_A, COMMIT_B = "a" * 40, "0123456789abcdef0123456789abcdef01234567"
EXAMPLES = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}] * 3


def _snapshot(hub, repo_id, commit, config='{"model_type": "llama"}'):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/, blobs/}."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (snap / "config.json").write_text(config)
    (snap / "model.safetensors").write_bytes(b"same bytes in every commit")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_a_hub_reference_is_keyed_by_its_snapshot_commit(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_id = "some-org/some-model"

    def key():
        return ref_cache_key(EXAMPLES, repo_id, torch.float32, False)

    assert hub_snapshot(repo_id) is None and key() is None  # no snapshot: nothing pins it, no key
    snap_a = _snapshot(hub, repo_id, COMMIT_A)
    assert hub_snapshot(repo_id) == snap_a
    key_a = key()
    assert key_a is not None and key() == key_a
    # main moves on to another commit (same config, same file sizes): another key
    snap_b = _snapshot(hub, repo_id, COMMIT_B)
    assert hub_snapshot(repo_id) == snap_b
    key_b = key()
    assert key_b not in (None, key_a)
    # back to the first commit: its key again; the name alone never decides
    (hub / "models--some-org--some-model" / "refs" / "main").write_text(COMMIT_A + "\n")
    assert key() == key_a
    assert hub_snapshot(repo_id, revision=COMMIT_B) == snap_b
    # HF_HOME/hub when HF_HUB_CACHE is unset
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_snapshot(repo_id) is None
    shutil.copytree(hub, tmp_path / "home" / "hub")
    assert key() == key_a


def test_a_hub_reference_downloaded_while_computing_is_cached_under_its_commit(tmp_path, monkeypatch):
    """One process: no snapshot before computing (nothing looked up), one after (written under its commit's key)."""
    import torch.distributed as dist

    from hhdpo.training.ref_logps import cache_file

    hub, cache = tmp_path / "hub", tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo_id = "some-org/some-model"

    def path():
        key = ref_cache_key(EXAMPLES, repo_id, torch.float32, False)
        return None if key is None else cache_file(cache, key)

    def compute():  # what from_pretrained does on a miss: downloads the snapshot
        _snapshot(hub, repo_id, COMMIT_B)
        return torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, -5.0, -6.0])

    logs = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        c, r = cached_or_computed(path, 3, compute, torch.device("cpu"), logs.append)
        assert c.tolist() == [-1.0, -2.0, -3.0] and r.tolist() == [-4.0, -5.0, -6.0]
        written = path()
        assert written.is_file() and any(str(written) in m for m in logs), logs
        again = cached_or_computed(path, 3, lambda: pytest.fail("recomputed"), torch.device("cpu"), logs.append)
        assert [t.tolist() for t in again] == [c.tolist(), r.tolist()]
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- a read-only cache


def _read_only(cache) -> list[str]:
    """A command prefix under which ``cache`` is read-only: a read-only bind mount in a private mount
    namespace for root (file modes do not stop root; an Apptainer image is a read-only file system),
    a directory without write permission otherwise."""
    if os.geteuid() != 0:
        cache.chmod(0o555)
        return []
    return ["unshare", "--map-root-user", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(cache)]


def _two_ranks(prefix: list[str], args: list[str], env: dict, timeout: int = 600) -> tuple[int, str]:
    return _torchrun(["-m", "hhdpo.train", *args], env, timeout, prefix=tuple(prefix))


def test_a_read_only_cache_is_a_warning_and_every_rank_trains_on(tmp_path, hh_file, tiny_llama_dir):
    ro, rw = tmp_path / "ro-cache", tmp_path / "rw-cache"
    ro.mkdir()
    over = {"dpo_training.max_steps": 3}
    # the same run with a writable cache: the values it trains on
    rc, out = _two_ranks([], ["--config", CFG, *base_overrides(hh_file, tmp_path / "rw", **over), *_precompute(tiny_llama_dir)],
                         {"HHDPO_CACHE": str(rw)})
    assert rc == 0 and "reference log-probs cached in" in out, out[-3000:]

    rc, out = _two_ranks(_read_only(ro), ["--config", CFG, *base_overrides(hh_file, tmp_path / "ro", **over),
                                          *_precompute(tiny_llama_dir)], {"HHDPO_CACHE": str(ro)})
    assert rc == 0, out[-3000:]
    assert out.count("warning: reference log-probs not cached") == 1, out[-3000:]
    assert "Read-only file system" in out or "Permission denied" in out, out[-3000:]
    assert "Traceback" not in out
    assert list(ro.iterdir()) == []  # nothing written, no temp file left
    assert [s for s, _ in _losses(tmp_path / "ro")] == [1, 2, 3]
    assert [l for _, l in _losses(tmp_path / "ro")] == pytest.approx([l for _, l in _losses(tmp_path / "rw")], abs=1e-6)
