"""Restarts that make progress, rank-0 failures that end every rank, and W&B across attempts:
real (tiny-model) training runs on HH pairs, stopped by real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hhdpo.core.io import read_jsonl
from tests.conftest import REPO, run_cli
from tests.launch.test_launch import _procs_with
from tests.training.test_train import CFG, base_overrides, tree_digest


def _tiny(model_dir) -> list[str]:
    return [f"policy_model={model_dir}", f"ref_model={model_dir}", "dpo_training.lr_scheduler=constant",
            "dpo_training.group_by_length=false"]


def _steps(save: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(save / "metrics.jsonl") if "loss" in r] if (save / "metrics.jsonl").is_file() else []


def _state(save: Path) -> dict:
    return json.loads((save / "run_state.json").read_text())


def _start(args: list, env: dict | None = None) -> subprocess.Popen:
    """``hhdpo train ARGS`` in its own session (so that the whole tree can be killed at once)."""
    return subprocess.Popen([sys.executable, "-m", "hhdpo", "train", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def _wait_until(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early:\n{proc.stdout.read()[-3000:]}")
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.1)




def _wandb_runs(save: Path) -> list[Path]:
    """W&B's offline run folders in save_dir (offline-run-<time>-<id>), oldest first."""
    return sorted((save / "wandb").glob("offline-run-*"))


# ----------------------------------------------------------------------------- A. restarts that make progress


def test_named_checkpoint_starts_the_run_and_later_attempts_continue_from_the_runs_newest(tmp_path, hh_file, tiny_llama_dir):
    """Run B starts from run A's step-2 checkpoint (another run's directory); preempted after checkpoints of
    its own, the same command continues from B's newest one: not from A's step 2 again (which used to set
    B's progress aside as an abandoned branch, so a preemptible job looped without progress)."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*_tiny(tiny_llama_dir), "checkpoint.keep_last=5"]
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, a, **{"dpo_training.max_steps": 4}), *common,
                "checkpoint.save_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    named = a / "checkpoints" / "step_0000002"
    a_before = sorted(p.name for p in (a / "checkpoints").iterdir())

    steps = 24
    cmd = ["--config", CFG, "--nproc-per-node", 2, *base_overrides(hh_file, b, **{"dpo_training.max_steps": steps}),
           *common, "checkpoint.save_steps=2", f"checkpoint.resume={named}"]
    proc = _start(cmd)
    _wait_until(proc, lambda: (b / "checkpoints" / "step_0000006" / "meta.json").is_file())
    proc.send_signal(signal.SIGUSR2)  # SLURM's preemption signal (only the launcher gets it; it passes it on)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 42, out[-3000:]
    k = _state(b)["step"]
    assert _state(b)["status"] == "preempted" and 6 <= k < steps, _state(b)
    assert _state(b)["resumed_from"] == {"path": str(named.resolve()), "step": 2}
    assert f"resumed from {named}" in out

    r = run_cli("train", *cmd)  # the requeue: the same command, checkpoint.resume still naming A's step 2
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {b / 'checkpoints' / f'step_{k:07d}'} at step {k}" in r.stdout, r.stdout[-3000:]
    assert "abandoned" not in r.stdout and not list((b / "checkpoints").glob("abandoned_*"))
    assert _steps(b) == list(range(3, steps + 1))  # every step once: B's own from A's step 2 on
    assert _state(b)["status"] == "completed" and _state(b)["resumed_from"]["step"] == 2
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == a_before  # run A untouched


def test_run_killed_before_its_first_checkpoint_starts_over(tmp_path, hh_file, tiny_llama_dir):
    """SIGKILL (an OOM kill, a node failure) before any checkpoint: the same command used to exit 2
    ("already holds a run"), and `afterok` then cancelled the chain. Now it starts over, its earlier
    logs set aside into logs/attempt-1/, every step logged once; a completed run stays protected."""
    save = tmp_path / "run"
    steps = 20
    cmd = ["--config", CFG, "--nproc-per-node", 2, *base_overrides(hh_file, save, **{"dpo_training.max_steps": steps}),
           *_tiny(tiny_llama_dir), "checkpoint.save_steps=0", "wandb.mode=offline"]
    proc = _start(cmd, env={"WANDB_SILENT": "true"})
    _wait_until(proc, lambda: len(_steps(save)) >= 3)
    # the launcher, torchrun and both workers (torchrun starts each in a session of its own): nothing is saved
    for pid in _procs_with(str(save)):
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed = _state(save)
    assert killed["status"] == "running" and not list((save / "checkpoints").glob("step_*"))
    old_steps = _steps(save)

    r = run_cli("train", *cmd, env={"WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "starting over" in r.stdout and "resume=no" in r.stdout, r.stdout[-3000:]
    aside = save / "logs" / "attempt-1"
    assert [m["step"] for m in read_jsonl(aside / "metrics.jsonl") if "loss" in m] == old_steps
    assert json.loads((aside / "run_state.json").read_text()) == killed
    assert (aside / "margins" / "global_margins_log.jsonl").is_file()
    assert _steps(save) == list(range(1, steps + 1))  # each step once, none of the killed attempt's
    assert [r["step"] for r in read_jsonl(save / "logs/margins/global_margins_log.jsonl")] == list(range(1, steps + 1))
    state = _state(save)
    assert state["status"] == "completed" and (save / "model.safetensors").is_file()
    # the new attempt is a new W&B run: the killed attempt's steps stay with the old one
    assert state["wandb_run_id"] != killed["wandb_run_id"]
    assert {p.name.rsplit("-", 1)[1] for p in _wandb_runs(save)} == {killed["wandb_run_id"], state["wandb_run_id"]}

    # the same command again finds the run done and changes nothing (an eval of its weights stays current)
    before = tree_digest(save)
    r = run_cli("train", *cmd, env={"WANDB_SILENT": "true"})
    assert r.returncode == 0 and f"completed at step {steps}: nothing to do" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert tree_digest(save) == before
    # a completed run is still protected: with no checkpoint to continue it is refused, nothing changed
    r = run_cli("train", *cmd, "checkpoint.resume=never")
    assert r.returncode == 2 and "already holds a run" in r.stderr, r.stderr[-3000:]
    assert _state(save) == state


def test_resume_selection_follows_the_run_not_the_named_checkpoint(tmp_path):
    """The selection rule alone (no training): the named checkpoint starts the run; once run_state.json
    records it, the run's newest checkpoint wins, even after keep_last pruned the named one; naming
    another checkpoint starts a new branch; leftovers of a run that never completed start over, of a
    completed one (or without a run state) are refused."""
    from hhdpo.core.config import ConfigError, load_config
    from hhdpo.training.checkpoint import find_resume_checkpoint, set_aside_attempt, starts_over

    def checkpoint(d: Path, step: int) -> Path:
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step}))
        return d

    other = checkpoint(tmp_path / "other" / "checkpoints" / "step_0000004", 4)
    save = tmp_path / "run"

    def cfg(resume: str):
        return load_config(None, [f"dpo_training.save_dir={save}", f"checkpoint.resume={resume}"])

    assert find_resume_checkpoint(cfg(str(other))) == other  # first attempt: the named one
    (save / "checkpoints").mkdir(parents=True)
    mine = checkpoint(save / "checkpoints" / "step_0000008", 8)
    assert find_resume_checkpoint(cfg(str(other))) == other  # nothing says this run started from it
    (save / "run_state.json").write_text(json.dumps({"status": "preempted", "step": 8, "total_steps": 20,
                                                     "resumed_from": {"path": str(other.resolve()), "step": 4}}))
    assert find_resume_checkpoint(cfg(str(other))) == mine  # a later attempt: the run's newest
    assert find_resume_checkpoint(cfg("auto")) == mine
    (other / "meta.json").unlink()  # pruned or gone: the run does not need it any more
    assert find_resume_checkpoint(cfg(str(other))) == mine
    another = checkpoint(tmp_path / "other" / "checkpoints" / "step_0000002", 2)
    assert find_resume_checkpoint(cfg(str(another))) == another  # a new branch
    assert find_resume_checkpoint(cfg("never")) is None

    fresh = tmp_path / "fresh"

    def fresh_cfg():
        return load_config(None, [f"dpo_training.save_dir={fresh}"])

    assert starts_over(fresh_cfg()) is False  # nothing there
    (fresh / "logs" / "margins").mkdir(parents=True)
    (fresh / "metrics.jsonl").write_text('{"step": 1, "loss": 0.6}\n')
    with pytest.raises(ConfigError, match="already holds a run"):
        starts_over(fresh_cfg())  # no run state: not known to be this run's
    for status, again in (("completed", False), ("running", True), ("preempted", True), ("bad_input", True)):
        (fresh / "run_state.json").write_text(json.dumps({"status": status}))
        if again:
            assert starts_over(fresh_cfg()) is True
        else:
            with pytest.raises(ConfigError, match="already holds a run"):
                starts_over(fresh_cfg())
    assert set_aside_attempt(fresh_cfg()) == fresh / "logs" / "attempt-1"
    assert sorted(p.name for p in (fresh / "logs" / "attempt-1").iterdir()) == ["margins", "metrics.jsonl", "run_state.json"]
    assert starts_over(fresh_cfg()) is False and set_aside_attempt(fresh_cfg()) is None
    (fresh / "metrics.jsonl").write_text('{"step": 1, "loss": 0.6}\n')
    assert set_aside_attempt(fresh_cfg()) == fresh / "logs" / "attempt-2"


# ----------------------------------------------------------------------------- B. one failure ends every rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank0_failure_under_torchrun_ends_both_ranks_with_its_message(tmp_path, hh_file, tiny_llama_dir):
    """Rank 0 cannot save the config (config.yaml is a directory): both ranks end at once, exit 1, rank 1
    with rank 0's message, the launcher with the documented code."""
    save = tmp_path / "run"
    (save / "config.yaml").mkdir(parents=True)
    t0 = time.time()
    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2, *base_overrides(hh_file, save), *_tiny(tiny_llama_dir),
                timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert time.time() - t0 < 120
    assert "IsADirectoryError" in r.stderr, r.stderr[-3000:]
    assert "rank 0 failed while starting the run's files" in r.stderr, r.stderr[-5000:]


def test_rank0_failure_in_the_export_ends_every_srun_rank(tmp_path, hh_file, tiny_llama_dir):
    """Two ranks started as srun starts them (each its own process, no torchrun agent to kill the
    others): rank 0's export fails after training (config.json is a directory). Rank 1 used to wait in
    the barrier after it until gloo's 30-minute timeout; now both exit 1 promptly, with rank 0's message."""
    save = tmp_path / "run"
    (save / "config.json").mkdir(parents=True)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(_start(["--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 3}),
                             *_tiny(tiny_llama_dir)], env=env))
    outs, ended = [], []
    for p in procs:
        outs.append(p.communicate(timeout=300)[0])
        ended.append(time.time())
    assert [p.returncode for p in procs] == [1, 1], outs[0][-3000:] + outs[1][-3000:]
    assert abs(ended[1] - ended[0]) < 60
    assert _steps(save) == [1, 2, 3] and (save / "checkpoints" / "step_0000003" / "meta.json").is_file()
    assert "IsADirectoryError" in outs[0] and "unexpected error (exit 1)" in outs[0], outs[0][-3000:]
    assert f"rank 0 failed while writing the Hugging Face export to {save}: IsADirectoryError" in outs[1], outs[1][-3000:]


def test_bad_hub_model_ends_every_rank_before_loading(tmp_path, hh_file, tiny_llama_dir):
    """A Hub model that cannot be downloaded (offline, not cached) is fetched once per node before anything
    loads it; every rank ends with the message, exit 2, said once."""
    save = tmp_path / "run"
    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2, *base_overrides(hh_file, save), *_tiny(tiny_llama_dir),
                "policy_model=hhdpo-test/no-such-model", env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    msg = "hhdpo train: error: model 'hhdpo-test/no-such-model': cannot download it from the Hugging Face Hub"
    assert r.stderr.count(msg) == 1, r.stderr[-3000:]
    assert _state(save)["status"] == "bad_input"


# ----------------------------------------------------------------------------- C. W&B


def test_wandb_online_init_failure_warns_and_continues_offline(tmp_path, hh_file, tiny_llama_dir):
    """`wandb.mode: online` on a node without network (here: a W&B server that refuses connections):
    a warning, then the same run id offline, and training completes."""
    save = tmp_path / "run"
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40, "WANDB_INIT_TIMEOUT": "5"}
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 2}),
                *_tiny(tiny_llama_dir), "wandb.mode=online", env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = _state(save)
    assert state["status"] == "completed"
    assert "W&B could not start online" in r.stderr and f"continuing offline with run id {state['wandb_run_id']}" in r.stderr
    (run,) = _wandb_runs(save)
    assert run.name.endswith("-" + state["wandb_run_id"]) and list(run.glob("*.wandb"))


def test_wandb_resume_reuses_the_run_and_rewinds_past_abandoned_steps(tmp_path, hh_file, tiny_llama_dir):
    """A resumed attempt continues the same W&B run id; resuming below the steps W&B already has (a named
    older checkpoint) rewinds it to the checkpoint's step (resume_from), so it shows the resumed steps."""
    save = tmp_path / "run"
    common = [*_tiny(tiny_llama_dir), "checkpoint.save_steps=2", "checkpoint.keep_last=3", "wandb.mode=offline"]
    env = {"WANDB_SILENT": "true"}
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 4}), *common, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rid = _state(save)["wandb_run_id"]
    assert "rewound" not in r.stdout

    # the same run, from its step-2 checkpoint: W&B has steps 3 and 4 of the abandoned branch
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 6}), *common,
                f"checkpoint.resume={save / 'checkpoints' / 'step_0000002'}", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[wandb] run {rid} rewound to step 2" in r.stdout, r.stdout[-3000:]
    assert _state(save)["wandb_run_id"] == rid and _steps(save) == list(range(1, 7))
    branch = _branch_point(_wandb_runs(save)[-1])
    assert branch == {"run_id": rid, "step": 2}, branch

    # and again, trained further (the same command would find the run done): its newest checkpoint, the
    # same id, nothing to rewind
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{"dpo_training.max_steps": 8}), *common,
                f"checkpoint.resume={save / 'checkpoints' / 'step_0000002'}", env=env)
    assert r.returncode == 0 and "rewound" not in r.stdout, r.stdout[-3000:]
    assert "resumed from " + str(save / "checkpoints" / "step_0000006") in r.stdout
    assert _steps(save) == list(range(1, 9))
    runs = _wandb_runs(save)
    assert len(runs) == 3 and all(p.name.endswith("-" + rid) for p in runs)
    assert _branch_point(runs[-1]) is None


def _branch_point(run_dir: Path):
    """The rewind point recorded in an offline W&B run (its config's ``_wandb.branch_point``, a JSON
    string inside the run's protobuf records, near the start of its .wandb file), or None."""
    import re

    (f,) = run_dir.glob("*.wandb")
    m = re.search(rb'"branch_point":\s*(\{[^}]*\})', f.read_bytes())
    return json.loads(m.group(1)) if m else None
