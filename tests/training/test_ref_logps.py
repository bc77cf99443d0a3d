"""The precomputed reference log-prob cache: keyed on what the values depend on, decided by rank 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hhdpo.core.config import DatasetConfig
from hhdpo.core.models import load_tokenizer
from hhdpo.data.hh import load_pairs, tokenize_pairs
from hhdpo.training.ref_logps import ref_cache_key
from tests.conftest import REPO, run_cli
from tests.training.test_train import CFG, _losses, base_overrides

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _retemplated(model_dir: Path, out: Path) -> Path:
    """A copy of ``model_dir`` whose chat template has another system prompt."""
    shutil.copytree(model_dir, out)
    f = out / "chat_template.jinja"
    assert SYSTEM in f.read_text()
    f.write_text(f.read_text().replace(SYSTEM, "You are a careful assistant"))
    return out


def _rewrite_weights_within_the_same_second(model_dir: Path) -> None:
    """New weight values, same file size and shapes, modification time moved by less than a second."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    sd = load_file(f)
    size, t = f.stat().st_size, f.stat().st_mtime_ns
    save_file({k: v + 0.01 for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    second = t // 10**9 * 10**9
    os.utime(f, ns=(second + 600_000_000, second + 600_000_000) if t - second < 500_000_000 else (second, second))
    assert f.stat().st_size == size and f.stat().st_mtime_ns // 10**9 == t // 10**9


def _pretouch(model_dir: Path) -> None:
    """Put the weights' modification time at 0.2 s into its second (room to move within it)."""
    f = model_dir / "model.safetensors"
    second = f.stat().st_mtime_ns // 10**9 * 10**9
    os.utime(f, ns=(second + 200_000_000, second + 200_000_000))


# ----------------------------------------------------------------------------- the key


def test_cache_key_follows_token_ids_weights_dtype_and_averaging(tmp_path, hh_file, tiny_llama_dir):
    pairs, _ = load_pairs(str(hh_file), "test[:16]", log=None)
    ref = tmp_path / "ref"
    shutil.copytree(tiny_llama_dir, ref)
    _pretouch(ref)

    def examples(model_dir, max_len=96):
        return tokenize_pairs(pairs, load_tokenizer(str(model_dir)), DatasetConfig(max_len=max_len, max_prompt_len=64))

    ex = examples(tiny_llama_dir)
    key = ref_cache_key(ex, str(ref), torch.float32, False)
    assert ref_cache_key(examples(tiny_llama_dir), str(ref), torch.float32, False) == key
    shorter = examples(tiny_llama_dir, max_len=80)
    assert shorter != ex and ref_cache_key(shorter, str(ref), torch.float32, False) != key
    other_template = examples(_retemplated(tiny_llama_dir, tmp_path / "retemplated"))
    assert other_template != ex and ref_cache_key(other_template, str(ref), torch.float32, False) != key
    assert ref_cache_key(ex, str(ref), torch.bfloat16, False) != key
    assert ref_cache_key(ex, str(ref), torch.float32, True) != key
    _rewrite_weights_within_the_same_second(ref)
    assert ref_cache_key(ex, str(ref), torch.float32, False) != key


# ----------------------------------------------------------------------------- through the trainer


def _precompute(tiny, **kw) -> list[str]:
    return [f"policy_model={kw.get('policy', tiny)}", f"ref_model={kw.get('ref', tiny)}",
            "dpo_training.precompute_ref_log_probs=true", "dpo_training.lr_scheduler=constant",
            "dpo_training.group_by_length=false"]


def test_changed_token_ids_or_reference_weights_miss_the_cache(tmp_path, hh_file, tiny_llama_dir):
    env = {"HHDPO_CACHE": str(tmp_path / "cache")}
    ref = tmp_path / "ref"
    shutil.copytree(tiny_llama_dir, ref)
    _pretouch(ref)
    over = {"dataset.subset": "train[:16]", "dpo_training.max_steps": 1}

    def train(name, **kw):
        r = run_cli("train", "--config", CFG, *base_overrides(hh_file, tmp_path / name, **over),
                    *_precompute(tiny_llama_dir, ref=ref, **kw), env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    train("first")
    assert "from cache" not in train("template", policy=_retemplated(tiny_llama_dir, tmp_path / "retemplated"))
    _rewrite_weights_within_the_same_second(ref)
    assert "from cache" not in train("rewritten")
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.pt"))) == 3
    assert "reference log-probs from cache" in train("again")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _torchrun(args: list[str], env: dict, timeout: int, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """2 ranks under torchrun (after a command ``prefix``) in their own session; on timeout the whole
    group (hung ranks too) is killed."""
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
                            cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):  # torchrun starts each worker in a session of its own
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        pytest.fail(f"2-rank run still running after {timeout} s (ranks waiting in different collectives?)\n{out[-3000:]}")
    return proc.returncode, out


def test_rank0_decides_a_cache_hit_when_only_it_sees_the_cache(tmp_path, hh_file, tiny_llama_dir):
    """A node-local HHDPO_CACHE per rank: rank 0 has the file, rank 1 does not. The run must not
    hang with rank 1 computing alone, and must train on rank 0's values (same losses as the
    one-process run that wrote them, 2 pairs per step either way)."""
    cache0, cache1 = tmp_path / "cache0", tmp_path / "cache1"
    one = tmp_path / "one"
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, one, **{"dpo_training.batch_size": 2,
                                                                           "dpo_training.max_steps": 3}),
                *_precompute(tiny_llama_dir), env={"HHDPO_CACHE": str(cache0)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((cache0 / "ref_logps").glob("*.pt"))) == 1

    # each rank takes its HHDPO_CACHE from HHDPO_CACHE_RANK<rank> before hhdpo reads it
    wrapper = tmp_path / "per_rank_cache.py"
    wrapper.write_text("import os, sys\n"
                       f"sys.path.insert(0, {str(REPO)!r})  # this checkout's hhdpo, not an installed one\n"
                       "os.environ['HHDPO_CACHE'] = os.environ['HHDPO_CACHE_RANK' + os.environ['RANK']]\n"
                       "from hhdpo.train import cli\n"
                       "sys.exit(cli(sys.argv[1:]))\n")
    two = tmp_path / "two"
    rc, out = _torchrun([str(wrapper), "--config", CFG, *base_overrides(hh_file, two, **{"dpo_training.max_steps": 3}),
                         *_precompute(tiny_llama_dir)],
                        {"HHDPO_CACHE_RANK0": str(cache0), "HHDPO_CACHE_RANK1": str(cache1)}, timeout=600)
    assert rc == 0, out[-3000:]
    assert "reference log-probs from cache" in out
    assert not (cache1 / "ref_logps").exists()  # rank 1 neither computed nor wrote anything
    a, b = _losses(one), _losses(two)
    assert [s for s, _ in b] == [1, 2, 3]
    assert [l for _, l in b] == pytest.approx([l for _, l in a], abs=1e-5)
