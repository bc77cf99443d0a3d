"""Typed configuration: YAML -> dataclass sections, validated once at load.

The layout is the seed's ``config.yaml`` (top-level ``policy_model``, ``ref_model``,
``precision`` and the sections ``dataset``, ``dpo_training``, ``tail_test``, ``HH_test``,
``vllm``, ``huggingface``) plus new sections with defaults (``checkpoint``, ``wandb``,
``judge``, ``eval``). Every stage takes a :class:`Config`; nothing reads YAML itself.

Errors are :class:`ConfigError` with the dotted key path, the offending value and what
was expected, e.g. ``dpo_training.dpo_beta: got -1 (float), expected a number > 0``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hhdpo.core.errors import BadInput

SECRET_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "HHDPO_JUDGE_API_KEY")


class ConfigError(BadInput):
    """A config file or override is invalid; the message names the key path."""


from hhdpo.core.config_schema import (  # noqa: F401 - the sections are part of this module's API
    _PY_KEYS,
    _YAML_KEYS,
    CheckpointConfig,
    Config,
    DatasetConfig,
    DPOTrainingConfig,
    EvalConfig,
    HHTestConfig,
    HuggingFaceConfig,
    JudgeConfig,
    SlurmConfig,
    TailTestConfig,
    VLLMConfig,
    WandbConfig,
    _to_yaml_dict,
)


@dataclass(frozen=True)
class RunPaths:
    """Where a run's outputs live, after the one path rule (see :func:`run_paths`)."""

    run: Path
    save: Path
    ckpt: Path
    metrics: Path
    state: Path
    tail: Path
    eval: Path
    policy_out: Path
    base_out: Path

    def gen_out(self, name: str) -> Path:
        """Generation output of model ``name`` (policy, base, or a name from HH_test.models)."""
        return {"policy": self.policy_out, "base": self.base_out}.get(name) or self.policy_out.parent / f"{name}_out.jsonl"


def run_paths(cfg: "Config") -> RunPaths:
    """The one path rule: output paths are relative to ``run_dir``; ``run_dir`` and input paths
    (dataset files, models, the config file) are relative to the working directory.

    Output keys: dpo_training.save_dir, checkpoint.dir, tail_test.log_dir, HH_test.HH_test_policy_out,
    HH_test.HH_test_base_out, eval.out_dir. Unset keys follow others: checkpoints and margins
    under save_dir, eval outputs beside the policy generations.
    """
    run = Path(cfg.run_dir or ".").expanduser()

    def under(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else run / q

    save = under(cfg.dpo_training.save_dir)
    policy_out = under(cfg.HH_test.HH_test_policy_out)
    return RunPaths(
        run=run, save=save,
        ckpt=under(cfg.checkpoint.dir) if cfg.checkpoint.dir else save / "checkpoints",
        metrics=save / "metrics.jsonl", state=save / "run_state.json",
        tail=under(cfg.tail_test.log_dir) if cfg.tail_test.log_dir else save / "logs" / "margins",
        eval=under(cfg.eval.out_dir) if cfg.eval.out_dir else policy_out.parent,
        policy_out=policy_out, base_out=under(cfg.HH_test.HH_test_base_out))




# --------------------------------------------------------------------------- loading


class _Raw(str):
    """A command-line override value, kept as text until its field type is known."""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or defaults), apply ``a.b=value`` overrides, validate, return."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level, got {type(data).__name__}")
    for ov in overrides or []:
        _apply_override(data, ov)
    return _build(Config, data, "")


def _apply_override(data: dict, ov: str) -> None:
    if "=" not in ov:
        raise ConfigError(f"override {ov!r}: expected key.path=value")
    key, value = ov.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {ov!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = _Raw(value)


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<top>'}: got {data!r}, expected a mapping (section)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = _PY_KEYS.get(key, key)
        if name not in names or key in _YAML_KEYS:
            valid = sorted(_YAML_KEYS.get(n, n) for n in names)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{prefix}{key}: unknown config key{hint}")
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{key}")
    obj = cls(**kwargs)
    for key, ok, expected in getattr(obj, "_checks", lambda: [])():
        if not ok:
            value = obj
            for part in key.split("."):  # a check across sections names the nested key it refuses
                value = getattr(value, _PY_KEYS.get(part, part))
            raise ConfigError(f"{prefix}{key}: got {value!r}, expected {expected}")
    return obj


def _coerce(value: Any, tp: Any, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, _Raw) and value.strip() in ("null", "None", "~", "")):
            return None
        return _coerce(value, args[0], path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, path + ".")
    if isinstance(value, _Raw) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{path}: cannot parse {str(value)!r}") from None
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and not isinstance(value, _Raw):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected a list")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected a mapping")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-7 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected a string")
    raise TypeError(f"unsupported config type {tp} at {path}")


# --------------------------------------------------------------------------- saving


def redact(text: str) -> str:
    """Replace any secret from the environment, and URL credentials, with ***.

    Secrets: the known variables, and any variable named like one (``*_API_KEY``, ``*_TOKEN``,
    ``*_SECRET``), which covers a judge key under a custom ``judge.api_key_env``.
    """
    names = set(SECRET_ENV_VARS) | {k for k in os.environ if k.endswith(("_API_KEY", "_TOKEN", "_SECRET"))}
    for var in sorted(names):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def config_yaml(cfg: Config) -> str:
    """The config as saved: secrets redacted, ``run_dir`` made absolute so that the saved file
    finds the run's outputs from any working directory."""
    d = cfg.to_dict()
    d["run_dir"] = str(Path(cfg.run_dir or ".").expanduser().resolve())
    return redact(yaml.safe_dump(d, sort_keys=False))


def save_config(cfg: Config, directory: str | os.PathLike, name: str = "config.yaml", previous_tag: str | None = None,
                log=None) -> Path:
    """Write the resolved config (secrets redacted) atomically into ``directory``.

    A different config already there (a resumed or rerun job whose settings changed) is kept
    as ``<stem>.<previous_tag>.yaml`` (default tag: a timestamp), not replaced, and the
    changed keys are passed to ``log``.
    """
    from hhdpo.core.io import atomic_write_text

    path = Path(directory) / name
    text = config_yaml(cfg)
    if path.is_file():
        changed = changed_keys(yaml.safe_load(path.read_text()) or {}, yaml.safe_load(text))
        if changed:
            kept = path.with_name(f"{path.stem}.{previous_tag or time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
            os.replace(path, kept)
            if log:
                log(f"[config] changed config {path} (previous one kept as {kept.name}): " + ", ".join(changed))
    atomic_write_text(path, text)
    return path


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return "null|" + _type_name(args[0])
    if args:
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return tp.__name__


def config_reference() -> str:
    """Every config key with its type, default and the comment beside its field."""
    import inspect

    field_re = re.compile(r"^\s+(\w+): [^=\n]+=.*?#\s*(.*)$", re.M)
    lines = []

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        notes = dict(field_re.findall(inspect.getsource(cls)))
        default = cls()  # nested sections' defaults; a field's own declared default wins (null = auto stays null)
        for f in dataclasses.fields(cls):
            key = prefix + _YAML_KEYS.get(f.name, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            note = f"  # {notes[f.name]}" if f.name in notes else ""
            value = f.default if f.default is not dataclasses.MISSING else getattr(default, f.name)
            lines.append(f"  {key} ({_type_name(hints[f.name])}) = {value!r}{note}")

    walk(Config, "")
    return "\n".join(lines)
