"""Shared fixtures: the real HH file (never copied), SmolLM2, and a tiny random Llama."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests import service_groups
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: the local SLURM cluster)

REPO = Path(__file__).resolve().parents[1]
HH_NAME = "harmless-base-test.jsonl.gz"


def hh_path() -> Path:
    env = os.environ.get("HH_DATA")
    p = Path(env) if env else REPO.parent / "shared" / "data" / "hh-rlhf"
    return p / HH_NAME if p.is_dir() else p


@pytest.fixture(scope="session")
def hh_file() -> Path:
    p = hh_path()
    if not p.is_file():
        pytest.fail(f"real HH data not found at {p}; set HH_DATA to the file or its directory")
    return p


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from hhdpo.core.models import resolve_model

    return Path(resolve_model("smollm2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (fast unit tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_cli(*args, env=None, timeout=900, cwd=None):
    """Run ``hhdpo ...`` in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "hhdpo", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=cwd or REPO)


class SharedJudgeServer:
    """One real vLLM judge server (SmolLM2 on CPU, ~30 s to start on an idle machine) for the tests that judge
    against one: :meth:`get` starts it on first use (again if it was stopped), :meth:`stop`
    ends it; the session's end stops it too."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.server = None
        self.starts = 0

    def get(self):
        from hhdpo.evaluation.serve import VLLMServer

        if self.server is None or not self.server.running():
            self.starts += 1
            self.server = VLLMServer("smollm2", log_file=self.log_dir / f"vllm-{self.starts}.log", startup_timeout=400)
            self.server.start()
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="session")
def vllm_judge(tmp_path_factory):
    """The shared :class:`SharedJudgeServer` (tests/evaluation/test_eval_e2e.py, tests/evaluation/test_judge_vllm.py)."""
    import vllm  # noqa: F401 - fails, never skips, where vllm is missing (`-m "not vllm"` deselects)
    shared = SharedJudgeServer(tmp_path_factory.mktemp("vllm-judge"))
    yield shared
    shared.stop()


@pytest.hookimpl(tryfirst=True)  # before xdist reads the group marks
def pytest_collection_modifyitems(config, items):
    """Known-slow tests first, group the service tests for xdist (tests/service_groups.py), and run the tests that use
    ``vllm_judge`` one after another (from where the first one is), so the shared server is up
    only while they run. Every other test keeps its order."""
    service_groups.slowest_first(items)
    service_groups.mark(config, items)
    users = [it for it in items if "vllm_judge" in getattr(it, "fixturenames", ())]
    if len(users) > 1:
        first = items.index(users[0])
        rest = [it for it in items if it not in users]
        items[:] = rest[:first] + users + rest[first:]


def pytest_configure(config):
    service_groups.configure(config)
    service_groups.share_cores(config)
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) sees every report
        config.pluginmanager.register(service_groups.BusyTime(), "hhdpo-busy-time")


def pytest_unconfigure(config):
    service_groups.unconfigure(config)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist does not know it
def pytest_xdist_make_scheduler(config, log):
    return service_groups.make_scheduler(config, log)
