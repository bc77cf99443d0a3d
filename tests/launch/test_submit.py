"""``hhdpo submit`` / hhdpo.submit (submitit) on the real local SLURM cluster, and locally.

Cluster jobs of this module are submitted at once (fixture ``jobs``) so that SLURM runs them side
by side; each test then waits for its own. Training uses the tests' tiny random Llama on a few HH
pairs; generation uses transformers (vLLM is tested in test_generate/test_eval_e2e); the judge is
the fake OpenAI Responses server (a paid remote service) over HTTP on 127.0.0.1, read by the real
openai client in the jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hhdpo.core.config import load_config
from hhdpo.core.io import read_jsonl
from hhdpo.evaluation.summarize import summarize
from hhdpo.launch import slurm as hs
from hhdpo.launch.sweep import grid_points, parse_grid, point_name, split_values, sweep_table
from tests.fake_responses_server import FakeOpenAIServer
from tests.slurm_cluster import REPO

CFG = REPO / "configs" / "smollm2_cpu.yaml"
GOLDEN = Path(__file__).parents[1] / "golden"
STEPS = 12


def _read(p) -> str:
    try:
        return Path(p).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def tiny_args(hh_file, model, run_dir, **kw) -> list[str]:
    o = {"run_dir": run_dir, "policy_model": model, "ref_model": model, "dataset.dataset_name": hh_file,
         "dataset.subset": "train[:64]", "dataset.val_ratio": 0, "dataset.max_len": 64, "dataset.max_prompt_len": 40,
         "dpo_training.batch_size": 1, "dpo_training.learning_rate": 1e-5, "dpo_training.warmup_steps": 2,
         "dpo_training.log_steps": 1, "dpo_training.max_steps": STEPS, "checkpoint.save_steps": 0,
         "HH_test.hh_test": hh_file, "HH_test.num_sample": 4, "HH_test.max_new_tokens": 8,
         "HH_test.backend": "transformers", "judge.model": "fake-judge", "slurm.cpus_per_task": 1, "slurm.time": 20}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def _result(job, timeout: float = 1200):
    """``job.result()``, failing the test instead of hanging when the job never ends."""
    end = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > end:
            pytest.fail(f"job {job.job_id} not done after {timeout} s (state {job.state}):\n{job.stdout()}")
        time.sleep(1)
    return job.results()[0]  # rank 0's


def _losses(run: Path) -> list[tuple[int, float]]:
    try:
        return [(r["step"], r["loss"]) for r in read_jsonl(run / "model" / "metrics.jsonl") if "loss" in r]
    except (FileNotFoundError, ValueError):
        return []


# ----------------------------------------------------------------------------- no cluster needed


def test_sweep_grid_parsing():
    assert split_values("0.01,0.1, 0.5") == ["0.01", "0.1", "0.5"]
    assert split_values("[harmless-base,helpful-base]") == ["[harmless-base,helpful-base]"]
    assert split_values("{a: 1, b: 2},{a: 3}") == ["{a: 1, b: 2}", "{a: 3}"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]
    fixed, axes = parse_grid(["dpo_training.dpo_beta=0.01,0.1", "run_dir=r", "dataset.data_dirs=[a,b]",
                              "dpo_training.loss_type=sigmoid,ipo"])
    assert fixed == ["run_dir=r", "dataset.data_dirs=[a,b]"]
    assert axes == [("dpo_training.dpo_beta", ["0.01", "0.1"]), ("dpo_training.loss_type", ["sigmoid", "ipo"])]
    pts = grid_points(axes)
    assert [tuple(p.values()) for p in pts] == [("0.01", "sigmoid"), ("0.01", "ipo"), ("0.1", "sigmoid"), ("0.1", "ipo")]
    assert point_name(pts[1]) == "dpo_beta-0.01_loss_type-ipo"
    assert point_name({"dataset.seed": "1", "HH_test.seed": "2"}) == "dataset.seed-1_HH_test.seed-2"


def _judged(path: Path, label: str, outcomes: str) -> Path:
    """A judged file: W = the model beat HH chosen, L = chosen won, T = tie, one prompt each."""
    winner = {"W": "model", "L": "chosen", "T": "tie"}
    path.write_text("".join(json.dumps({"idx": i, "model_id": label, "winner_model_vs_chosen": winner[o]}) + "\n"
                            for i, o in enumerate(outcomes)))
    return path


def test_sweep_table_rows_from_a_summary(tmp_path):
    # base: 2 wins of 4 decided (50 %); point a: 3 of 4 (75 %); prompts 0-3 shared
    base = _judged(tmp_path / "base_judged.jsonl", "base", "WLWL")
    a = _judged(tmp_path / "a_judged.jsonl", "a", "WWWL")
    b = _judged(tmp_path / "b_judged.jsonl", "b", "LLTL")
    summary = summarize([base, a, b], labels=["base", "a", "b"])
    table = sweep_table({"axes": ["dpo_training.dpo_beta"], "points": [
        {"name": "a", "values": {"dpo_training.dpo_beta": "0.1"}}, {"name": "b", "values": {"dpo_training.dpo_beta": "0.5"}}]},
        summary)
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["base", "a", "b"]
    assert rows["base"]["win_rate"] == 0.5 and rows["a"]["win_rate"] == 0.75 and rows["b"]["win_rate"] == 0.0
    assert (rows["b"]["wins"], rows["b"]["losses"], rows["b"]["ties"]) == (0, 3, 1)
    # paired, per prompt (win 1, tie 1/2, loss 0): a - base = (0 + 1 + 0 + 0) / 4; b - base = (-1 + 0 + -1/2 + 0) / 4
    assert rows["a"]["vs_base_diff"] == pytest.approx(0.25) and rows["a"]["vs_base_test"] == "paired"
    assert rows["b"]["vs_base_diff"] == pytest.approx(-0.375)
    assert rows["base"]["vs_base_diff"] is None
    lo, hi = rows["a"]["win_rate_ci"]
    assert lo < 0.75 < hi


def _hhdpo(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hhdpo", *map(str, args)], capture_output=True, text=True,
                          env=env or os.environ, cwd=cwd, timeout=120, check=False)


@pytest.mark.parametrize("mode", ["bare", "apptainer", "pyxis"])
def test_dry_run_renders_the_sbatch_file(tmp_path, mode):
    """Golden files (HHDPO_UPDATE_GOLDEN=1 rewrites them) pin what submitit would submit for a
    2-node x 8-GPU training in each container mode."""
    env = {k: v for k, v in os.environ.items() if k not in ("HHDPO_SIF", "HHDPO_IMAGE", "HHDPO_BINDS", "HF_HOME", "HHDPO_CACHE")}
    if mode == "apptainer":
        (tmp_path / "hhdpo.sif").write_bytes(b"")
        env["HHDPO_SIF"] = str(tmp_path / "hhdpo.sif")
    if mode == "pyxis":
        env["HHDPO_IMAGE"] = "registry.example.org/hhdpo:cuda"
    p = _hhdpo("submit", "train", "--dry-run", "--config", CFG, "run_dir=runs/golden", "slurm.nodes=2",
               "slurm.gpus_per_node=8", "slurm.partition=gpu", "slurm.account=proj", "slurm.time=1440",
               "slurm.extra={exclusive: ''}", env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got = p.stdout.replace(str(tmp_path.resolve()), "{CWD}").replace(str(REPO), "{REPO}")
    got = got.replace(sys.executable, "{PYTHON}")
    golden = GOLDEN / f"submit_train_dry_run_{mode}.txt"
    if os.environ.get("HHDPO_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_submit_refuses_bad_input_with_exit_2(tmp_path):
    p = _hhdpo("submit", "train", "--config", CFG, "slurm.cluster=lsf", cwd=tmp_path)
    assert p.returncode == 2 and "slurm.cluster: got 'lsf', expected one of slurm, local, debug" in p.stderr
    p = _hhdpo("submit", "sweep", "--config", CFG, "judge.model=a,b", cwd=tmp_path)
    assert p.returncode == 2 and "judge.model: only training keys can be swept" in p.stderr
    p = _hhdpo("submit", "sweep", "--config", CFG, "dpo_training.dpo_beta=0.1", cwd=tmp_path)
    assert p.returncode == 2 and "nothing to sweep" in p.stderr
    p = _hhdpo("submit", "sweep", "--config", CFG, "dpo_training.dpo_beta=0.1,-1", cwd=tmp_path)
    assert p.returncode == 2 and "dpo_training.dpo_beta: got -1" in p.stderr
    p = _hhdpo("submit", "deploy", "--config", CFG, cwd=tmp_path)
    assert p.returncode == 2 and "expected one of train, eval, pipeline, sweep" in p.stderr
    env = dict(os.environ, HHDPO_SIF=str(tmp_path / "missing.sif"))
    p = _hhdpo("submit", "train", "--config", CFG, "--dry-run", env=env, cwd=tmp_path)
    assert p.returncode == 2 and "HHDPO_SIF=" in p.stderr and "no such image file" in p.stderr
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- on the cluster


@pytest.fixture(scope="module")
def judge_server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs(slurm_cluster, hh_file, tiny_llama_dir, judge_server):
    """Every cluster job of the module, submitted at once from this process (submitit reads
    SLURM_CONF from os.environ, which the cluster fixture sets). A thread sends USR2 to one
    2-node training once it logged step 2."""
    from hhdpo.launch.sweep import submit_sweep
    from hhdpo.submit import submit_pipeline, submit_train

    shared = Path(tempfile.mkdtemp(prefix="hhdpo-submit-", dir="/tmp"))
    shared.chmod(0o755)
    tiny = Path(shutil.copytree(tiny_llama_dir, shared / "tiny"))
    judge = [f"judge.base_url={judge_server.base_url}"]
    t0 = time.monotonic()
    pipe = submit_pipeline(load_config(CFG, tiny_args(hh_file, tiny, shared / "pipe", **{"dpo_training.max_steps": 2})
                                       + judge))
    two = {name: submit_train(load_config(CFG, tiny_args(hh_file, tiny, shared / name, **{"slurm.nodes": 2})))
           for name in ("full", "preempted")}
    sweep = submit_sweep(str(CFG), tiny_args(hh_file, tiny, shared / "sweep", **{"dpo_training.max_steps": 2,
                                                                                "dpo_training.dpo_beta": "0.05,0.5"})
                         + judge)

    def preempt():
        job, run = two["preempted"], shared / "preempted"
        slurm_cluster.wait_for(lambda: len(_losses(run)) >= 2
                               or slurm_cluster.job_state(job.job_id) not in (None, "PENDING", "RUNNING"),
                               600, f"job {job.job_id} at step 2")
        slurm_cluster.run("scancel", "--signal=USR2", job.job_id)

    t = threading.Thread(target=preempt, daemon=True)
    t.start()
    yield SimpleNamespace(pipe=pipe, two=two, sweep=sweep, shared=shared, preempt=t, t0=t0)
    mine = [*pipe, *two.values(), *sweep["train"], *sweep["generate"], sweep["judge"], sweep["table"]]
    slurm_cluster.run("scancel", *(j.job_id for j in mine), check=False)  # a test that stopped early
    shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.slow
def test_submit_pipeline_runs_the_chain_and_returns_the_summary(jobs, slurm_cluster):
    assert [j.job_id for j in jobs.pipe] and len(jobs.pipe) == 3
    summary = _result(jobs.pipe[-1])  # raises if any job of the chain failed
    assert {r["label"]: r["n"] for r in summary["files"]} == {"policy": 4, "base": 4}
    assert sum(r["errors"] for r in summary["files"]) == 0
    run = jobs.shared / "pipe"
    assert summary == json.loads((run / "eval" / "summary.json").read_text())
    for name in ("policy", "base"):
        assert len(read_jsonl(run / "eval" / f"{name}_judged.jsonl")) == 4
    assert sorted(p.name for p in (run / "slurm" / "done").iterdir()) == ["generate.json", "judge.json", "train.json"]
    # each job waited for the one before it: afterok on its job id
    deps = [slurm_cluster.sacct(j.job_id, ("JobID", "Start", "End"))[0] for j in jobs.pipe]
    assert deps[0]["End"] <= deps[1]["Start"] and deps[1]["End"] <= deps[2]["Start"]
    # the pipeline's markers are slurm/pipeline.sh's: a rerun there submits nothing
    cfg = load_config(run / "slurm" / "submit" / "judge.yaml")
    assert hs.plan(cfg) == (["train", "generate", "judge"], [])


@pytest.mark.slow
def test_two_node_submitit_training_preempted_is_requeued_and_resumes(jobs, slurm_cluster):
    full, pre = jobs.two["full"], jobs.two["preempted"]
    res = _result(full)
    assert res["state"]["status"] == "completed" and res["rank"] == 0
    out = full.stdout()
    assert "[train] attempt=0 world=2 device=cpu backend=gloo" in out, out[-3000:]
    logs = _read(full.paths.stdout) + _read(Path(str(full.paths.stdout).replace("_0_log", "_1_log")))
    assert {"on n1", "on n2"} <= set(re.findall(r"rank \d of 2 (on n\d)", logs)), logs[-3000:]

    jobs.preempt.join(timeout=900)
    res = _result(pre)  # the requeued attempt's result
    assert res["state"]["status"] == "completed"
    text = pre.stdout()
    m = re.search(r"\[train\] preempted at step (\d+): checkpoint saved", text)
    assert m and 2 <= int(m.group(1)) < STEPS, text[-4000:]
    assert "requeueing through submitit" in text and "[train] attempt=1 world=2" in text, text[-4000:]
    assert re.search(rf"\[ckpt\] resumed from .*step_{int(m.group(1)):07d} at step {m.group(1)}", text), text[-4000:]
    slurm_cluster.wait_for(lambda: [r["State"] for r in slurm_cluster.sacct(pre.job_id, duplicates=True)]
                           == ["REQUEUED", "COMPLETED"], 30, f"sacct {pre.job_id}: REQUEUED, COMPLETED")
    a, b = _losses(jobs.shared / "full"), _losses(jobs.shared / "preempted")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-5)


@pytest.mark.slow
def test_sweep_compares_every_point_with_the_base(jobs):
    table = _result(jobs.sweep["table"])
    assert [r["name"] for r in table["rows"]] == ["base", "dpo_beta-0.05", "dpo_beta-0.5"]
    assert [r["values"] for r in table["rows"]] == [{}, {"dpo_training.dpo_beta": "0.05"}, {"dpo_training.dpo_beta": "0.5"}]
    assert all(r["n"] == 4 and r["errors"] == 0 for r in table["rows"])
    assert all(r["vs_base_test"] == "paired" for r in table["rows"][1:])
    root = jobs.shared / "sweep"
    for name in ("dpo_beta-0.05", "dpo_beta-0.5"):  # each point trained into its own run directory
        saved = load_config(root / name / "model" / "config.yaml")
        assert saved.dpo_training.dpo_beta == float(name.split("-")[1])
        assert (root / name / "model" / "model.safetensors").is_file()
    md = _read(root / "eval" / "sweep.md")
    assert "| dpo_beta-0.05 | 0.05 | 4 |" in md and "| base | – | 4 |" in md, md
    assert (root / "eval" / "sweep.png").stat().st_size > 0
    # the base model was generated once, and every training ran as one job array
    assert len(read_jsonl(root / "eval" / "base_out.jsonl")) == 4
    assert len({t.job_id.split("_")[0] for t in jobs.sweep["train"]}) == 1
    print(f"every cluster job of this module done {time.monotonic() - jobs.t0:.0f} s after submission")


@pytest.mark.slow
def test_local_cluster_runs_the_same_chain_without_slurm(tmp_path, hh_file, tiny_llama_dir, judge_server, monkeypatch):
    """slurm.cluster=local: the CLI runs each job as a process here, in turn, and prints the summary."""
    monkeypatch.delenv("SLURM_CONF", raising=False)
    args = tiny_args(hh_file, tiny_llama_dir, tmp_path / "run", **{"dpo_training.max_steps": 2, "slurm.cluster": "local"})
    p = subprocess.run([sys.executable, "-m", "hhdpo", "submit", "pipeline", "--config", str(CFG), *args,
                        f"judge.base_url={judge_server.base_url}"], capture_output=True, text=True, timeout=900,
                       check=False, env={k: v for k, v in os.environ.items() if k != "SLURM_CONF"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| policy | 4 |" in p.stdout and "| base | 4 |" in p.stdout, p.stdout[-3000:]
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert {r["label"] for r in summary["files"]} == {"policy", "base"}
