"""Memory-safe loading under FSDP2: meta-device models, one reader, scattered shards.

Every rank builds the model with its parameters on the meta device (:func:`meta_model`),
shards it, and rank 0 reads the safetensors one tensor at a time (:class:`LazyStateDict`)
and scatters each into the shards (:func:`load_sharded`): host RAM holds at most one full
tensor, instead of one full fp32 model per rank.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

from hhdpo.core.models import ModelError, resolve_model


@contextlib.contextmanager
def _params_on_meta():
    """Parameters registered inside go to the meta device; buffers are computed for real.

    Non-persistent buffers (rotary ``inv_freq``) are in no checkpoint, so they must come from
    the modules' own ``__init__``. A parameter already on meta is registered as is, so
    ``tie_weights`` keeps one Parameter for the embedding and the LM head.
    """
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def meta_model(spec: str, dtype, trust_remote_code: bool = False):
    """``spec``'s model without weights: parameters on meta (in ``dtype``), buffers on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"model {spec!r}: cannot load config: {e}") from None
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.tie_weights()  # no-op when construction already tied them
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise ModelError(f"model {spec!r}: tie_word_embeddings is set but the LM head has its own weight")
    return model


class LazyStateDict(Mapping):
    """A safetensors checkpoint's tensors by name; each is read from disk when indexed.

    Only the headers are read up front. Indexing opens the file lazily (safetensors memory-maps
    it) and returns that one tensor, so a caller that drops each tensor after use never holds
    more than one.
    """

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        d = Path(directory)
        index = d / "model.safetensors.index.json"
        files = ([d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
                 if index.is_file() else sorted(d.glob("*.safetensors")))
        if not files:
            raise ModelError(f"{d}: no *.safetensors weights (sharded loading reads safetensors only)")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    self.files[k] = f
                    self.shapes[k] = tuple(st.get_slice(k).get_shape())

    def __getitem__(self, key: str):
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as st:
            return st.get_tensor(key)

    def __contains__(self, key) -> bool:
        return key in self.files  # Mapping's default would read the tensor

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def weights_dir(spec: str) -> Path:
    """The local directory holding ``spec``'s safetensors (a Hub id: from the HF cache or the Hub)."""
    path = Path(resolve_model(spec))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    except Exception as e:  # offline and uncached, no such repo, ...
        raise ModelError(f"model {spec!r}: cannot fetch its safetensors: {e}") from None


def _aliases(model) -> dict[int, list[str]]:
    """Every name of each parameter, by identity (a tied weight has two)."""
    out: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(n)
    return out


def _checkpoint_keys(model, sd: LazyStateDict) -> tuple[list[str], str | None]:
    """The checkpoint key of each distinct parameter and stored persistent buffer, or what is wrong."""
    aliases = _aliases(model)  # a tied weight may be stored under either name
    persistent = set(model.state_dict().keys())
    wanted = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in persistent and n in sd]
    keys = {name: next((n for n in aliases.get(id(t), [name]) if n in sd), None) for name, t in wanted}
    missing = [name for name, k in keys.items() if k is None]
    bad = [f"{k} {sd.shapes[k]} vs {tuple(t.shape)}" for (_, t), k in zip(wanted, keys.values())
           if k is not None and sd.shapes[k] != tuple(t.shape)]
    if missing:
        return [], f"its safetensors lack {len(missing)} of the model's tensors, e.g. {missing[:3]}"
    if bad:
        return [], f"its safetensors disagree with its config on {len(bad)} shapes (stored vs model), e.g. {bad[:3]}"
    return list(keys.values()), None


def load_sharded(model, spec: str, device) -> None:
    """Materialise an FSDP2-sharded meta model on ``device`` with ``spec``'s weights.

    Call on every rank after ``fully_shard``. Rank 0 reads each tensor once and scatters its
    rows; every rank keeps only its own shard. Buffers computed at construction (rotary
    ``inv_freq``) are kept, since ``to_empty`` leaves them uninitialised.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    rank0, keys, error = dist.get_rank() == 0, [], None
    if rank0:
        try:
            sd = LazyStateDict(weights_dir(spec))
            keys, problem = _checkpoint_keys(model, sd)
            error = problem and f"model {spec!r}: {problem}"
        except ModelError as e:
            error = str(e)
    # rank 0 alone reads the files: it tells the others what comes, or why nothing will
    msg = [error, keys]
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise ModelError(msg[0])
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    tied = [names for names in _aliases(model).values() if len(names) > 1]
    model.to_empty(device=device)
    # to_empty made new tensors: look them up again by name
    live = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    if any(live[n] is not live[names[0]] for names in tied for n in names):
        raise RuntimeError(f"to_empty untied the shared parameters {tied}; load them before sharding instead")
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        for key in msg[1]:
            t = live[key]
            full = sd[key].to(device=device, dtype=t.dtype) if rank0 else None
            if isinstance(t, DTensor) and _row_sharded(t):
                _scatter_rows(full, t.to_local(), t.shape)
                continue
            if not rank0:
                full = torch.empty(t.shape, dtype=t.dtype, device=device)
            dist.broadcast(full, src=0)
            if isinstance(t, DTensor):
                t.to_local().copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local())
            else:
                t.copy_(full)
            del full


def _row_sharded(t) -> bool:
    """FSDP2's usual layout: dim 0 split over a 1-D mesh of all ranks (torch.chunk's sizes)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    return (t.device_mesh.ndim == 1 and t.device_mesh.size() == dist.get_world_size() and t.dim() > 0
            and tuple(t.placements) == (Shard(0),))


def _scatter_rows(full, local, shape) -> None:
    """Rank 0's ``full`` tensor scattered by rows into each rank's ``local`` shard.

    A scatter, not a broadcast: the other ranks never hold the full tensor. Chunks are padded
    to one size (collectives need equal sizes) only where torch.chunk leaves them short.
    """
    import torch
    import torch.distributed as dist

    world, rows = dist.get_world_size(), -(-shape[0] // dist.get_world_size())
    fits = local.shape[0] == rows and local.is_contiguous()
    recv = local if fits else torch.empty((rows, *shape[1:]), dtype=local.dtype, device=local.device)
    chunks = None
    if full is not None:
        chunks = [c if c.shape[0] == rows else torch.cat([c, c.new_zeros((rows - c.shape[0], *shape[1:]))])
                  for c in full.chunk(world)]
        chunks += [full.new_zeros((rows, *shape[1:]))] * (world - len(chunks))
    dist.scatter(recv, chunks, src=0)
    if recv is not local:
        local.copy_(recv[:local.shape[0]])
