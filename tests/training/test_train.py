"""Trainer tests: bad inputs, exact resume after SIGTERM, precomputed reference, and the
end-to-end 2-rank FSDP run on SmolLM2 with the real HH file."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hhdpo.core.io import read_jsonl
from hhdpo.training.metrics import TRAIN_KEYS
from tests.conftest import REPO, run_cli

CFG = "configs/smollm2_cpu.yaml"


def base_overrides(hh_file, save_dir, **kw):
    o = {"dataset.dataset_name": hh_file, "dataset.subset": "train[:64]", "dataset.val_ratio": 0,
         "dataset.max_len": 64, "dataset.max_prompt_len": 40, "dpo_training.batch_size": 1,
         "dpo_training.learning_rate": 1e-5, "dpo_training.warmup_steps": 2, "dpo_training.log_steps": 1,
         "dpo_training.max_steps": 6, "dpo_training.save_dir": save_dir, "checkpoint.save_steps": 0,
         "tail_test.lambda": 0.3, "tail_test.adaptive_beta": True, "tail_test.alpha": 0.5}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("case, needle", [
    ("unknown_key", "dpo_training.dpo_bta: unknown config key; did you mean dpo_training.dpo_beta"),
    ("wrong_type", "dpo_training.batch_size: got 'four'"),
    ("malformed_jsonl", "bad.jsonl:2: malformed JSON"),
    ("missing_data", "nope.jsonl.gz: data file or directory not found"),
    ("missing_model", "model './no-such-model'"),
])
def test_bad_inputs_exit_nonzero_and_touch_nothing(tmp_path, hh_file, case, needle):
    save = tmp_path / "run"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (save / "model.safetensors").write_bytes(b"earlier run")
    before = tree_digest(save)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}) + "\n{oops\n")
    extra = {
        "unknown_key": ["dpo_training.dpo_bta=0.2"],
        "wrong_type": ["dpo_training.batch_size=four"],
        "malformed_jsonl": [f"dataset.dataset_name={bad}"],
        "missing_data": [f"dataset.dataset_name={tmp_path / 'nope.jsonl.gz'}"],
        "missing_model": ["policy_model=./no-such-model"],
    }[case]
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save), *extra, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert tree_digest(save) == before


def test_refuses_save_dir_holding_another_run(tmp_path, hh_file):
    save = tmp_path / "run"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    before = tree_digest(save)
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save), timeout=300)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert tree_digest(save) == before


@pytest.mark.parametrize("overrides, error", [
    # 3 pairs cannot fill 2 ranks x 4: every rank raises DataError after preflight
    ({"dataset.subset": "test[:3]", "dpo_training.batch_size": 4}, "3 training pairs are too few"),
    # known only once the ranks are up (precision: auto with fsdp: false passes the config check)
    ({"dpo_training.fsdp": "false"}, "dpo_training.fsdp: false needs one process in float32; this run has 2 rank(s) in float32"),
])
def test_bad_input_inside_the_workers_is_reported_once_and_recorded(tmp_path, hh_file, tiny_llama_dir, overrides, error):
    """Every rank raises; rank 0 alone says it and records it in run_state.json, and the run exits 2."""
    save = tmp_path / "run"
    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2, *base_overrides(hh_file, save, **overrides),
                f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.count(f"hhdpo train: error: {error}") == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    state = json.loads((save / "run_state.json").read_text())
    assert state == {"status": "bad_input", "message": state["message"]} and state["message"].startswith(error)


def test_no_empty_metric_records_when_validation_is_impossible(tmp_path, hh_file, tiny_llama_dir):
    save = tmp_path / "run"
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, save, **{
        "dataset.val_ratio": 0.02, "dpo_training.batch_size": 2, "dpo_training.max_steps": 3, "dpo_training.eval_steps": 1}),
        f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_jsonl(save / "metrics.jsonl")
    assert [m.get("step") for m in records] == [1, 2, 3]
    assert all(tuple(m) == TRAIN_KEYS for m in records)
    assert r.stdout.count("no validation: the validation split has 1 pair(s)") == 1, r.stdout[-3000:]


# ----------------------------------------------------------------------------- resume


def _losses(save: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(save / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_sigterm_resume_matches_uninterrupted_run(tmp_path, hh_file, tiny_llama_dir):
    """2 FSDP ranks: SIGTERM after step k, requeue, same losses and tail state. The tiny Llama: the
    checkpoint mechanics are the model's size-independent part (SmolLM2 trains on 2 ranks in
    test_two_rank_fsdp_training_learns_and_exports), and its fast steps leave room to stop early."""
    steps = 30
    model = {"policy_model": tiny_llama_dir, "ref_model": tiny_llama_dir}

    def overrides(save):
        return base_overrides(hh_file, save, **{"dpo_training.max_steps": steps}, **model)

    full = tmp_path / "full"
    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2, *overrides(full))
    assert r.returncode == 0, r.stderr[-3000:]

    part = tmp_path / "part"
    cmd = [sys.executable, "-m", "hhdpo", "train", "--config", CFG, "--nproc-per-node", "2", *overrides(part)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        done = [s for s, _ in _losses(part)] if (part / "metrics.jsonl").exists() else []
        if done and done[-1] >= 2:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # like SLURM's preemption signal to the job step
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 42, out[-3000:]
    state = json.loads((part / "run_state.json").read_text())
    k = state["step"]
    assert state["status"] == "preempted" and 2 <= k < steps, state
    assert (part / "checkpoints" / f"step_{k:07d}" / "meta.json").is_file()
    assert not (part / "model.safetensors").exists()

    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2, *overrides(part))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout

    a, b = _losses(full), _losses(part)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
    assert [l for _, l in b] == pytest.approx([l for _, l in a], rel=1e-5)
    for name in ("global_tail_test_and_beta_log.jsonl", "global_margins_log.jsonl"):
        ta, tb = read_jsonl(full / "logs/margins" / name), read_jsonl(part / "logs/margins" / name)
        assert len(ta) == len(tb) > 0
        for x, y in zip(ta, tb):
            assert x.keys() == y.keys()
            for key in x:
                if isinstance(x[key], float):
                    assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (name, key)
                else:
                    assert y[key] == x[key]
    betas = [r["beta"] for r in read_jsonl(full / "logs/margins/global_tail_test_and_beta_log.jsonl")]
    assert len(set(betas)) > 1  # adaptive beta really moved, and was restored on resume


# ----------------------------------------------------------------------------- precomputed reference


def test_precomputed_reference_matches_live_reference(tmp_path, hh_file, tiny_llama_dir):
    env = {"HHDPO_CACHE": str(tmp_path / "cache")}
    common = [f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}"]
    live, pre = tmp_path / "live", tmp_path / "pre"
    r1 = run_cli("train", "--config", CFG, *base_overrides(hh_file, live, **{"dpo_training.max_steps": 4}), *common, env=env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli("train", "--config", CFG, *base_overrides(hh_file, pre, **{"dpo_training.max_steps": 4}), *common,
                 "dpo_training.precompute_ref_log_probs=true", env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert [l for _, l in _losses(pre)] == pytest.approx([l for _, l in _losses(live)], rel=1e-4)
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.pt"))) == 1
    r3 = run_cli("train", "--config", CFG, *base_overrides(hh_file, tmp_path / "again", **{"dpo_training.max_steps": 1}),
                 *common, "dpo_training.precompute_ref_log_probs=true", env=env)
    assert r3.returncode == 0 and "reference log-probs from cache" in r3.stdout


def test_single_process_resume_and_group_by_length(tmp_path, hh_file, tiny_llama_dir):
    """One fp32 process runs the model unwrapped (no FSDP): its checkpoints resume exactly too, and
    the length-grouped forwards, FSDP2 on one rank and bf16 train on the same losses as one padded fp32 forward."""
    common = [f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", "dpo_training.batch_size=4",
              "dataset.max_len=96", "dataset.max_prompt_len=64", "dpo_training.lr_scheduler=constant"]
    from hhdpo.training.precision import cpu_bf16_native

    runs = {}
    # bf16: 2 steps only, since without AVX512_BF16/AMX each bf16 matmul is emulated (~100x an fp32 one)
    for name, extra in {"auto": [], "one": ["dpo_training.group_by_length=false"],
                        "fsdp": ["dpo_training.fsdp=true"],
                        "bf16": ["precision=bf16", "dpo_training.max_steps=2"]}.items():
        r = run_cli("train", "--config", CFG, *base_overrides(hh_file, tmp_path / name), *common, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"fsdp={'yes' if name in ('fsdp', 'bf16') else 'no'}" in r.stdout, r.stdout[-3000:]
        runs[name] = [l for _, l in _losses(tmp_path / name)]
    assert len(runs["auto"]) == 6 and len(set(runs["auto"])) > 1
    assert runs["auto"] == pytest.approx(runs["one"], rel=1e-5)
    # fsdp: true at one process: FSDP2 on a 1-rank mesh (meta-device build, weights streamed into
    # the shards, no autocast, padded single forward): the multi-GPU code path, same losses
    assert runs["fsdp"] == pytest.approx(runs["one"], rel=1e-5)
    assert len(runs["bf16"]) == 2
    assert runs["bf16"] == pytest.approx(runs["one"][:2], rel=2e-2) and runs["bf16"] != runs["one"][:2]
    # bf16 is FSDP2's mixed precision even here: the policy's bf16 compute copy is the bf16 reference,
    # so before any update the two agree exactly (under autocast they did not: an fp32 residual stream)
    assert runs["bf16"][0] == pytest.approx(math.log(2), rel=1e-6)
    # the emulated-bf16 warning, once (from the last run: bf16)
    assert r.stderr.count("on a CPU without native bf16") == (0 if cpu_bf16_native()[0] else 1), r.stderr[-3000:]

    part = tmp_path / "part"
    # stop after 3 of the 6 steps (the schedule is constant, so max_steps does not change the LR), then go on
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, part, **{"dpo_training.max_steps": 3}), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, part), *common)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert [s for s, _ in _losses(part)] == list(range(1, 7))
    assert [l for _, l in _losses(part)] == pytest.approx(runs["auto"], rel=1e-5)
    # the changed config is reported, and the one the first 3 steps ran with is kept
    assert "changed config" in r.stdout and "dpo_training.max_steps: 3 -> 6" in r.stdout
    assert yaml_load(part / "config.before_step_0000003.yaml")["dpo_training"]["max_steps"] == 3
    assert yaml_load(part / "config.yaml")["dpo_training"]["max_steps"] == 6


def test_resume_on_another_number_of_ranks_continues_the_same_run(tmp_path, hh_file, tiny_llama_dir):
    """A checkpoint from one unwrapped process (2 pairs per step) resumed on 2 FSDP ranks (1 pair
    each): same next pairs, same losses as the uninterrupted one-process run; then on other
    batch sizes, FSDP shards back to one process, continuing where the data left off."""
    common = [f"policy_model={tiny_llama_dir}", f"ref_model={tiny_llama_dir}", "dpo_training.lr_scheduler=constant",
              "dpo_training.group_by_length=false"]
    full, part = tmp_path / "full", tmp_path / "part"
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, full, **{"dpo_training.batch_size": 2}), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, part, **{"dpo_training.batch_size": 2, "dpo_training.max_steps": 3}), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2, *base_overrides(hh_file, part), *common)
    assert r.returncode == 0 and "resumed from" in r.stdout and "seen again" not in r.stdout, r.stderr[-3000:]
    a = [m for m in read_jsonl(full / "metrics.jsonl") if "loss" in m]
    b = [m for m in read_jsonl(part / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in b] == list(range(1, 7))
    for key in ("logps/chosen", "logps/rejected"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-5), key
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], abs=1e-5)
    assert [m["epoch"] for m in b] == pytest.approx([m["epoch"] for m in a])
    # 12 of the 64 pairs used; go on with 2 ranks x 2 pairs: micro-batch 3 of 16, not 6 (the old per-rank count)
    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2,
                *base_overrides(hh_file, part, **{"dpo_training.batch_size": 2, "dpo_training.max_steps": 7}), *common)
    assert r.returncode == 0 and "micro-batch 3)" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert [m["epoch"] for m in read_jsonl(part / "metrics.jsonl") if "loss" in m][-1] == pytest.approx((12 + 4) / 64)
    # and back from FSDP shards to one unwrapped process with 4 pairs per step
    r = run_cli("train", "--config", CFG, *base_overrides(hh_file, part, **{"dpo_training.batch_size": 4, "dpo_training.max_steps": 8}), *common)
    assert r.returncode == 0 and "micro-batch 4)" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert [m["epoch"] for m in read_jsonl(part / "metrics.jsonl") if "loss" in m][-1] == pytest.approx((16 + 4) / 64)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_rank_fsdp_training_learns_and_exports(tmp_path, hh_file):
    save = tmp_path / "run"
    r = run_cli("train", "--config", CFG, "--nproc-per-node", 2, *base_overrides(hh_file, save, **{
        "dataset.subset": "train[:16]", "dataset.max_len": 64, "dataset.max_prompt_len": 40,
        "dpo_training.batch_size": 2, "dpo_training.max_steps": 8, "dpo_training.log_steps": 4,
        "dpo_training.learning_rate": 2e-5, "dpo_training.lr_scheduler": "constant", "tail_test.adaptive_beta": False}))
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [m for m in read_jsonl(save / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in logs] == [4, 8]
    last = logs[-1]  # second pass over the same 16 training pairs (4 steps of 2 ranks x 2 pairs each)
    assert last["rewards/accuracies"] > 0.5 and last["loss"] < math.log(2), logs
    assert last["loss"] < logs[0]["loss"]
    assert all(m["tokens/s"] > 0 and m["grad_norm"] > 0 for m in logs)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((save / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(save)
    model = AutoModelForCausalLM.from_pretrained(save)
    assert tok.chat_template and sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    saved = yaml_load(save / "config.yaml")
    assert saved["dpo_training"]["max_steps"] == 8
    assert (save / "logs/margins/global_tail_test_and_beta_log.jsonl").is_file()


def yaml_load(p):
    import yaml

    return yaml.safe_load(Path(p).read_text())
