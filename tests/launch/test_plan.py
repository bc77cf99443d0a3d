"""``hhdpo plan``: the table users size their sbatch from. Expected numbers are worked by hand here."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from hhdpo.core.config import load_config
from hhdpo.launch.plan import GiB, cli, gpu_memory, model_arch
from tests.conftest import run_cli

LLAMA = str(Path(__file__).parents[2] / "configs" / "llama31_8b.yaml")
# Llama-3.1-8B: embeddings and LM head 128,256 x 4,096 each; per layer q, o 4,096^2, k, v 4,096 x 1,024,
# gate, up, down 4,096 x 14,336, two norms of 4,096; 32 layers; the final norm
LLAMA_LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # 218,112,000
LLAMA_N = 2 * 128256 * 4096 + 32 * LLAMA_LAYER + 4096  # 8,030,261,248


def plan_out(capsys, *argv) -> str:
    assert cli([*argv]) == 0
    return capsys.readouterr().out


def line(out: str, start: str) -> str:
    found = [ln for ln in out.splitlines() if ln.strip().startswith(start)]
    assert len(found) == 1, (start, out)
    return found[0]


def gib(out: str, row: str) -> tuple[float, float]:
    """The with-AC and without-AC GiB of a memory row."""
    return tuple(float(x.replace(",", "")) for x in line(out, row).split()[-2:])


def test_llama_parameters_gradients_and_optimizer_bytes():
    a = model_arch("meta-llama/Llama-3.1-8B-Instruct")
    assert (a.layer_params, a.params) == (LLAMA_LAYER, LLAMA_N) and LLAMA_N == 8_030_261_248
    rows = {k.split(":")[0]: v for k, v, _ in gpu_memory(a, load_config(LLAMA), 32, 2, True)}
    assert rows["parameters"] == 4 * LLAMA_N / 32 == 1_003_782_656  # fp32 master weights, 1/32
    assert rows["gradients"] == 1_003_782_656
    assert rows["optimizer"] == 8 * LLAMA_N / 32 == 2_007_565_312  # AdamW exp_avg + exp_avg_sq in fp32
    assert rows["reference model"] == 2 * LLAMA_N / 32 == 501_891_328  # bf16, sharded the same way
    assert not any("unsharded" in k for k in rows)  # reduce-scatter every micro-batch: no full gradient
    deferred = gpu_memory(a, load_config(LLAMA, ["dpo_training.defer_grad_sync=true"]), 32, 2, True)
    assert [v for k, v, _ in deferred if "unsharded fp32 gradients" in k] == [4 * LLAMA_N]  # 32.1 GB on every GPU
    # a precomputed reference needs no reference model on the GPUs
    pre = gpu_memory(a, load_config(LLAMA, ["dpo_training.precompute_ref_log_probs=true"]), 32, 2, True)
    assert not any(k.startswith("reference") for k, _, _ in pre)


def test_smollm2_shape_from_the_real_local_model(smollm2_dir):
    from safetensors import safe_open

    a = model_arch(str(smollm2_dir))
    assert str(smollm2_dir) in a.source and a.tied
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:  # tied: the LM head is not stored
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    # by hand: 49,152 x 576 embeddings + 30 x (2 x 576^2 + 2 x 576 x 192 + 3 x 576 x 1,536 + 2 x 576) + 576
    assert a.params == stored == 49152 * 576 + 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) + 576
    assert model_arch("smollm2").params == a.params  # the alias from the built-in table, nothing converted


def test_shipped_config_on_4_nodes_x_8_gpus(capsys):
    out = plan_out(capsys, "--config", LLAMA, "--nodes", "4", "--gpus-per-node", "8")
    assert "on 4 node(s) x 8 GPU(s) (world size 32), bf16 compute, FSDP2 full sharding" in out
    assert line(out, "data:").startswith("data:     160,800 pairs: records of Anthropic/hh-rlhf train in 4 subset(s)")
    assert "8.03e9 parameters (8,030,261,248)" in out
    sched = line(out, "schedule:")
    assert "global batch 128" in sched and "1,231 total steps" in sched and "5 validations" in sched
    assert "warning" not in out
    assert gib(out, "parameters:") == (0.9, 0.9)  # 1,003,782,656 B = 0.93 GiB
    assert gib(out, "optimizer:") == (1.9, 1.9)  # 2,007,565,312 B = 1.87 GiB
    ac, no_ac = gib(out, "total")
    assert ac < no_ac < 80
    assert "fits with activation checkpointing, fits without" in out
    # node 0 at the export: rank 0 holds the fp32 state dict (4 B x N) and its bf16 copy (2 B x N) = 44.87 GiB
    assert "+ 44.9 (rank 0 gathers the fp32 state dict and its bf16 copy)" in line(out, "at export")
    assert "1 needed, 4 allowed (1 + slurm.max_num_timeout 3): fits" in out
    assert re.search(r"^sbatch: +--nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --time=04:00:00 --mem=\d+G", out, re.M)
    mem = int(re.search(r"--mem=(\d+)G", out)[1])
    assert 6 * LLAMA_N / GiB < mem <= int(load_config(LLAMA).slurm.mem.rstrip("G"))  # the shipped mem covers it


def test_shipped_config_on_one_node_fits_its_slurm_section(capsys):
    out = plan_out(capsys, "--config", LLAMA, "--gpus-per-node", "8", "--nodes", "1")
    assert "global batch 32" in line(out, "schedule:") and "4,924 total steps" in line(out, "schedule:")
    assert gib(out, "parameters:") == (3.7, 3.7)  # 4 B x N / 8 = 4,015,130,624 B = 3.74 GiB
    assert re.search(r"attempts: \d needed, 4 allowed .*: fits$", line(out, "attempts:"))


def test_throughput_options_and_attempts(capsys):
    # 64 pairs/s, either way: 1,000 tokens/s x 32 GPUs / 500 tokens per pair
    for rate in (["--pairs-per-s", "64"], ["--tokens-per-s-per-gpu", "1000", "--tokens-per-pair", "500"]):
        out = plan_out(capsys, "--config", LLAMA, "--nodes", "4", "--gpus-per-node", "8", *rate)
        # 1,231 steps x 128 pairs / 64 pairs/s = 2,462 s = 41 min
        assert "train 41 min (1,231 steps x 128 pairs)" in out
    # one attempt of 50 minutes leaves 30 minutes of work after the lead and the start-up: not enough
    out = plan_out(capsys, "--config", LLAMA, "--pairs-per-s", "64", "--nodes", "4", "--gpus-per-node", "8",
                   "slurm.time=50", "slurm.max_num_timeout=0")
    att = line(out, "attempts:")
    assert "2 needed, 1 allowed" in att and "does NOT fit" in att
    need = int(re.search(r"slurm.time >= (\d+) min", att)[1])
    assert f"--time={need // 60:02d}:{need % 60:02d}:00" in out
    again = plan_out(capsys, "--config", LLAMA, "--pairs-per-s", "64", "--nodes", "4", "--gpus-per-node", "8",
                     f"slurm.time={need}", "slurm.max_num_timeout=0")
    assert "1 needed, 1 allowed" in line(again, "attempts:") and line(again, "attempts:").endswith("fits")


def test_gpu_memory_limit(capsys):
    out = plan_out(capsys, "--config", LLAMA, "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem-gib", "24")
    assert "on 24 GiB GPUs: fits with activation checkpointing, does NOT fit without" in out


def test_pairs_counted_from_known_sizes_a_local_file_or_given(capsys, hh_file):
    out = plan_out(capsys, "--config", LLAMA, "dataset.subset=train[:10%]")
    # every subset sliced on its own: 4,253.7 -> 4,254; 4,383.5 -> 4,384; 2,200.7 -> 2,201; 5,242.1 -> 5,242
    assert line(out, "data:").startswith("data:     16,081 pairs")
    out = plan_out(capsys, "--config", LLAMA, "dataset.data_dirs=[helpful-online]")
    assert line(out, "data:").startswith("data:     22,007 pairs")
    out = plan_out(capsys, "--config", LLAMA, f"dataset.dataset_name={hh_file}", "dataset.subset=test[:40]",
                   "--nodes", "1", "--gpus-per-node", "1", "dataset.val_ratio=0")
    # the first 40 records of the file all parse: 40 // 1 rank // 2 pairs // 2 accumulation = 10 steps
    assert line(out, "data:").startswith("data:     40 pairs: parsed from") and "10 total steps" in out
    out = plan_out(capsys, "--config", LLAMA, "--pairs", "1000", "dataset.dataset_name=someone/other-prefs")
    assert line(out, "data:") == "data:     1,000 pairs: --pairs"


@pytest.mark.parametrize("argv, message", [
    (["policy_model=someone/unknown-7b"], "hhdpo plan: error: policy_model: 'someone/unknown-7b' has no local config.json"),
    (["dataset.dataset_name=someone/other-prefs"], "hhdpo plan: error: dataset.dataset_name: someone/other-prefs"),
    (["--nodes", "0"], "hhdpo plan: error: --nodes: got 0"),
    (["dpo_training.warmup_stepz=1"], "hhdpo plan: error: dpo_training.warmup_stepz: unknown config key"),
])
def test_bad_input_exits_2_naming_the_key(capsys, argv, message):
    assert cli(["--config", LLAMA, *argv]) == 2
    assert message in capsys.readouterr().err


def test_console_script_with_options_and_overrides_in_any_order():
    r = run_cli("plan", "dpo_training.max_steps=50", "--config", LLAMA, "--nodes", "4", "checkpoint.save_steps=100",
                "--gpus-per-node", "8", timeout=120)
    assert r.returncode == 0, r.stderr
    # 50 steps: warmup 100 reaches them (the tail test's too), eval_steps 250 and save_steps 100 are not below them
    assert "50 total steps" in r.stdout and r.stdout.count("warning:") == 4, r.stdout
    assert "the learning rate never leaves its warmup" in r.stdout and "checkpoint.save_steps=100" in r.stdout


def test_shared_prompt_time_and_the_head_and_budget_memory_rows(capsys):
    """A shared-prompt run (the CPU default) forwards each pair's prompt once: at max_len 512, 373 - 141 =
    232 tokens a pair instead of 373; the chunked head holds one chunk's logits; a token budget bounds the
    activations."""
    cpu = ["--config", LLAMA, "--nodes", "1", "--gpus-per-node", "0", "device=cpu", "precision=fp32"]
    shared, full = (line(plan_out(capsys, *cpu, f"dpo_training.share_prompt={v}"), "time at") for v in ("true", "false"))
    assert "/ 232 tokens forwarded, each prompt once (dpo_training.share_prompt)" in shared
    assert "/ 373 tokens per pair" in full
    # the trainer's logged tokens/s counts the prompt twice: a given rate divides by all 373 (x 8 ranks)
    given = line(plan_out(capsys, *cpu, "--tokens-per-s-per-gpu", "373"), "time at")
    assert "/ 373 tokens per pair" in given and "= 8.0 pairs/s" in given
    out = plan_out(capsys, "--config", LLAMA, "--nodes", "4", "--gpus-per-node", "8", "dpo_training.logits_chunk_tokens=256")
    # 256 positions x 128,256 x (2 x 2 B bf16 logits + 8 B fp32 copy and gradient) = 0.37 GiB
    assert "logits: 256 positions at once" in out and gib(out, "logits:") == (0.4, 0.4)
    whole = plan_out(capsys, "--config", LLAMA, "--nodes", "4", "--gpus-per-node", "8", "dpo_training.logits_chunk_tokens=0")
    # 2 pairs x 2 rows x 512 = 2,048 positions x 128,256 x (2 x 2 + 8 B, with the live reference's) = 2.94 GiB
    assert gib(whole, "logits: 2,048 positions x 128,256") == (2.9, 2.9)
    budget = plan_out(capsys, "--config", LLAMA, "--nodes", "4", "--gpus-per-node", "8",
                      "dpo_training.max_tokens_per_micro_batch=4096")
    assert "activations: <= 4,096 tokens per forward (max_tokens_per_micro_batch 4,096)" in budget
    # twice the tokens of the fixed 2,048: twice the activations without AC
    assert gib(budget, "activations:")[1] == pytest.approx(2 * gib(out, "activations:")[1], abs=0.15)  # rounded to 0.1
