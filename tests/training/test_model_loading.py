"""Sharded loading (meta-device build, rank 0 streams the weights into FSDP2 shards) against a
plain ``from_pretrained``, on 2 gloo ranks; and the training precision checks of resolve_runtime."""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_dir(request, tmp_path_factory):
    """A 2-layer random Llama; the untied one with Llama-3.1's rope scaling (a non-default inv_freq).
    An odd vocabulary: the embedding's rows split unevenly over 2 ranks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = request.param == "tied"
    cfg = LlamaConfig(vocab_size=161, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied,
                      **({} if tied else {"rope_parameters": LLAMA3_ROPE}))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(f"llama-{request.param}")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 160, (2, 24), generator=g)
    at = torch.zeros(2, 24, dtype=torch.bool)
    at[0, 10:20], at[1, 5:23] = True, True  # "response" positions of different lengths
    return ids, at


def _measure(model) -> dict:
    """Full logits, response-only log-probs through lm_head_only_at, and their gradients."""
    from hhdpo.core.models import lm_head_only_at
    from hhdpo.training.loss import token_logps

    ids, at = _inputs()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with lm_head_only_at(model, at):
        head = model(input_ids=ids).logits
    logps = token_logps(head, ids[:, 1:][at[:, :-1]])
    logps.sum().backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    return {"logits": logits, "logps": logps.detach(), "grads": grads}


def _spawn(fn, *args):
    import torch.multiprocessing as mp

    from hhdpo.evaluation.serve import free_port

    mp.spawn(fn, args=(2, free_port(), *args), nprocs=2, join=True)


def _init(rank, world, port):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank, world, port, model_dir, out):
    import torch.distributed as dist

    _init(rank, world, port)
    torch.save({"loader": _loader_checks(rank, world, model_dir), "trainer": _trainer_checks(rank, world, model_dir),
                "short": _short_checkpoint(world, out / "short")}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _short_checkpoint(world, model_dir) -> str:
    """What each rank raises for a checkpoint lacking tensors (rank 0 alone reads it: no rank may hang)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hhdpo.training import sharded_load  # noqa: F401
    from hhdpo.core import models

    model = sharded_load.meta_model(str(model_dir), torch.float32)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    try:
        sharded_load.load_sharded(model, str(model_dir), torch.device("cpu"))
    except models.ModelError as e:
        return str(e)
    return "loaded"


@pytest.fixture(scope="module")
def ranks(tiny_dir, tmp_path_factory) -> list[dict]:
    """What each of 2 gloo ranks measured (one spawn per model: starting ranks is the slow part)."""
    out = tmp_path_factory.mktemp("ranks")
    short = out / "short"  # the config asks for a third layer that the weights do not have
    short.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    (short / "model.safetensors").symlink_to(tiny_dir / "model.safetensors")
    _spawn(_worker, tiny_dir, out)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _loader_checks(rank, world, model_dir) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hhdpo.training import sharded_load  # noqa: F401

    reads = []
    get = sharded_load.LazyStateDict.__getitem__
    sharded_load.LazyStateDict.__getitem__ = lambda self, k: reads.append(k) or get(self, k)
    model = sharded_load.meta_model(str(model_dir), torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded_load.load_sharded(model, str(model_dir), torch.device("cpu"))
    res = _measure(model)
    sharded_load.LazyStateDict.__getitem__ = get
    res.update(reads=reads, buffers={n: b.clone() for n, b in model.named_buffers()},
               tied_after_step=model.lm_head.weight is model.model.embed_tokens.weight,
               shard_rows=model.model.layers[0].mlp.up_proj.weight.to_local().shape[0],
               embed_rows=model.model.embed_tokens.weight.to_local().shape[0])
    return res


def test_sharded_meta_load_matches_plain_load(tiny_dir, ranks):
    """2 FSDP2 ranks built on meta and filled from rank 0: same logits, response log-probs and
    gradients (activation checkpointing on) as the plainly loaded model; rotary buffers and the
    embedding tie intact; only rank 0 reads the file, each tensor once."""
    from hhdpo.core.models import load_model

    plain = load_model(str(tiny_dir))
    plain.config.use_cache = False
    want = _measure(plain)
    tied = plain.config.tie_word_embeddings
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied
    for got in (r["loader"] for r in ranks):
        torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["logps"], want["logps"], rtol=1e-5, atol=1e-5)
        assert got["grads"].keys() == want["grads"].keys()
        for n, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)
        assert got["buffers"].keys() == dict(plain.named_buffers()).keys()
        for n, b in plain.named_buffers():  # rotary inv_freq: recomputed, not left as to_empty's garbage
            assert torch.equal(got["buffers"][n], b), n
        assert got["tied_after_step"] == tied
        assert got["shard_rows"] == 64  # 128 rows of up_proj, half per rank
    assert [r["loader"]["embed_rows"] for r in ranks] == [81, 80]  # torch.chunk's uneven split
    assert ranks[1]["loader"]["reads"] == []
    reads = ranks[0]["loader"]["reads"]
    stored = 1 + 2 * 9 + 1 + (0 if tied else 1)  # embed, 9 per layer, final norm, lm_head unless tied
    assert len(reads) == len(set(reads)) == stored


def _trainer_checks(rank, world, model_dir) -> dict:
    import hhdpo.training.trainer as ht
    from hhdpo.core.config import Config

    def no_full_load(*a, **k):
        raise AssertionError("a rank loaded the full model")

    import hhdpo.training.runtime as hr

    hr.load_model = no_full_load
    cfg = Config()
    cfg.dpo_training.activation_checkpointing = True
    trainer = types.SimpleNamespace(cfg=cfg, device=torch.device("cpu"), dtype=torch.bfloat16, world=world, rank=rank,
                                    sharded=world > 1)
    policy, hf_config, arch = ht.DPOTrainer._build_model(trainer, str(model_dir), trainable=True)
    ref, _, _ = ht.DPOTrainer._build_model(trainer, str(model_dir), trainable=False)
    # before any forward: FSDP2 may keep the root's unsharded (bf16 compute) parameters after one
    dtypes = {name: sorted({str(p.dtype) for p in m.parameters()}) for name, m in (("policy", policy), ("ref", ref))}
    ids, _ = _inputs()
    with torch.no_grad():
        logits = {"policy": policy(input_ids=ids).logits.float(), "ref": ref(input_ids=ids).logits.float()}
    return {"dtypes": dtypes, "ref_trainable": any(p.requires_grad for p in ref.parameters()), "arch": arch,
            "hf_dtype": str(hf_config.dtype), "logits": logits}


def test_trainer_builds_sharded_models_from_meta_with_a_compute_dtype_reference(tiny_dir, ranks):
    """_build_model on 2 ranks never loads a full model on a rank; the policy keeps fp32 master
    shards (bf16 compute), the frozen reference is stored in bf16; both compute the plain model's logits."""
    from hhdpo.core.models import load_model

    ids, _ = _inputs()
    with torch.no_grad():
        want = {name: load_model(str(tiny_dir), dtype=dtype)(input_ids=ids).logits.float()
                for name, dtype in (("policy", torch.float32), ("ref", torch.bfloat16))}
    for got in (r["trainer"] for r in ranks):
        assert got["dtypes"] == {"policy": ["torch.float32"], "ref": ["torch.bfloat16"]}
        assert not got["ref_trainable"] and got["arch"] == "LlamaForCausalLM" and got["hf_dtype"] == "torch.float32"
        # bf16 compute: the policy's fp32 weights are cast like the reference's stored ones
        torch.testing.assert_close(got["logits"]["ref"], want["ref"], rtol=0, atol=0)
        torch.testing.assert_close(got["logits"]["policy"], want["ref"], rtol=0, atol=0)
        assert not torch.equal(got["logits"]["policy"], want["policy"])  # really computed in bf16


def test_a_checkpoint_lacking_tensors_fails_on_every_rank_as_bad_input(ranks):
    from hhdpo.core.errors import BadInput
    from hhdpo.core.models import ModelError

    assert issubclass(ModelError, BadInput)
    for r in ranks:
        assert "its safetensors lack 9 of the model's tensors" in r["short"] and "model.layers.2." in r["short"], r["short"]


# ----------------------------------------------------------------------------- precision


def _cfg(precision):
    from hhdpo.core.config import Config

    return Config(precision=precision, device="cpu")


def test_fp16_training_is_refused_as_bad_config():
    from hhdpo.core.config import ConfigError
    from hhdpo.core.errors import BadInput
    from hhdpo.training.runtime import resolve_runtime

    with pytest.raises(ConfigError, match=r"precision: fp16 .*use bf16 \(or fp32\)") as e:
        resolve_runtime(_cfg("fp16"))
    assert isinstance(e.value, BadInput)  # exit 2
    assert resolve_runtime(_cfg("auto"))[2] == torch.float32  # CPU default unchanged


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_cpu_without_native_bf16_warns_once(monkeypatch, native):
    from hhdpo.training import sharded_load  # noqa: F401
    from hhdpo.training.runtime import resolve_runtime
    from hhdpo.training import precision

    caps = {"avx2": True, "avx512_bf16": native, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    precision.warn_if_cpu_bf16_emulated.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                assert resolve_runtime(_cfg("bf16"))[2] == torch.bfloat16
            resolve_runtime(_cfg("fp32"))
    finally:
        precision.warn_if_cpu_bf16_emulated.cache_clear()
    msgs = [str(w.message) for w in seen if "bf16" in str(w.message)]
    if native:
        assert msgs == []
    else:
        assert len(msgs) == 1, msgs
        assert "without native bf16" in msgs[0] and "no AVX512_BF16/AMX_BF16" in msgs[0] and "x the fp32 time" in msgs[0]

