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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hhdpo.errors import BadInput

SECRET_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "HHDPO_JUDGE_API_KEY")


class ConfigError(BadInput):
    """A config file or override is invalid; the message names the key path."""


# --------------------------------------------------------------------------- sections


@dataclass
class DatasetConfig:
    dataset_name: str = "Anthropic/hh-rlhf"  # Hub id, or a local .jsonl/.jsonl.gz file
    subset: str = "train[:10%]"  # split with optional slice, as in the seed
    data_dirs: list[str] = field(default_factory=list)  # Hub subsets (harmless-base, ...); [] = all
    val_ratio: float = 0.05
    seed: int = 42
    max_len: int = 512  # prompt + response tokens
    max_prompt_len: Optional[int] = None  # default: max_len // 2
    use_chat_template: bool = True

    def _checks(self):
        yield "val_ratio", 0.0 <= self.val_ratio < 1.0, "a number in [0, 1)"
        yield "max_len", self.max_len >= 8, "an integer >= 8"
        yield "max_prompt_len", self.max_prompt_len is None or 0 < self.max_prompt_len < self.max_len, \
            "null or an integer in (0, dataset.max_len)"
        yield "subset", _SPLIT_RE.match(self.subset) is not None, "a split like 'train' or 'train[:10%]'"


@dataclass
class DPOTrainingConfig:
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; -1 = run `epochs` epochs
    batch_size: int = 4  # pairs per rank per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"  # constant | linear | cosine (after linear warmup)
    warmup_steps: int = 0  # LR warmup and, unless tail_test.warmup_steps is set, tail-test warmup
    log_steps: int = 10
    eval_steps: int = 0  # 0 = validate only at the end
    max_grad_norm: float = 1.0
    dpo_beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # cDPO (sigmoid) / robust DPO epsilon
    reference_free: bool = False
    average_log_prob: Optional[bool] = None  # length-averaged log-probs instead of sums; null = auto: averaged for ipo (as its paper and TRL), summed otherwise; saved resolved
    precompute_ref_log_probs: bool = False
    activation_checkpointing: bool = False
    group_by_length: Optional[bool] = None  # forward a micro-batch's rows in length-sorted groups (less padding); null = on for one process, off under FSDP
    fsdp_layer_cls: list[str] = field(default_factory=list)  # default: model._no_split_modules
    seed: int = 42
    save_dir: str = "dpo_model"

    def __post_init__(self):
        if self.average_log_prob is None:
            # IPO's target 1/(2 beta) is on the scale of a per-token log-ratio; summed, h is
            # tens to hundreds and the squared loss is all clipping
            self.average_log_prob = self.loss_type == "ipo"

    def _checks(self):
        yield "epochs", self.epochs >= 1, "an integer >= 1"
        yield "max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 or an integer >= 1"
        yield "batch_size", self.batch_size >= 1, "an integer >= 1"
        yield "gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "an integer >= 1"
        yield "learning_rate", self.learning_rate > 0, "a number > 0"
        yield "weight_decay", self.weight_decay >= 0, "a number >= 0"
        yield "lr_scheduler", self.lr_scheduler in ("constant", "linear", "cosine"), "one of constant, linear, cosine"
        yield "warmup_steps", self.warmup_steps >= 0, "an integer >= 0"
        yield "log_steps", self.log_steps >= 1, "an integer >= 1"
        yield "eval_steps", self.eval_steps >= 0, "an integer >= 0"
        yield "max_grad_norm", self.max_grad_norm >= 0, "a number >= 0 (0 disables clipping)"
        yield "dpo_beta", self.dpo_beta > 0, "a number > 0"
        yield "loss_type", self.loss_type in ("sigmoid", "ipo", "hinge", "robust"), "one of sigmoid, ipo, hinge, robust"
        yield "label_smoothing", 0.0 <= self.label_smoothing < 0.5, "a number in [0, 0.5)"
        yield "save_dir", bool(self.save_dir), "a non-empty path"


@dataclass
class CheckpointConfig:
    save_steps: int = 0  # 0 = no intermediate checkpoints (SIGTERM/SIGUSR2 still save)
    resume: str = "auto"  # auto | never | <path to a step_XXXXXXX checkpoint>
    keep_last: int = 2
    dir: Optional[str] = None  # null = <save_dir>/checkpoints

    def _checks(self):
        yield "save_steps", self.save_steps >= 0, "an integer >= 0"
        yield "keep_last", self.keep_last >= 1, "an integer >= 1"


@dataclass
class TailTestConfig:
    enabled: bool = True
    delta: float = 0.1
    lambda_: float = 0.1  # YAML key: `lambda`
    warmup_steps: Optional[int] = None  # default: dpo_training.warmup_steps
    log_dir: Optional[str] = None  # null = <save_dir>/logs/margins
    save_npy: bool = True
    adaptive_beta: bool = False
    alpha: float = 0.05
    gamma: float = 1.0
    beta_min: float = 0.01
    beta_max: float = 1.0

    def _checks(self):
        yield "delta", 0.0 < self.delta < 1.0, "a number in (0, 1)"
        yield "lambda", 0.0 < self.lambda_ <= 1.0, "a number in (0, 1]"
        yield "warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "null or an integer >= 0"
        yield "beta_min", 0 < self.beta_min <= self.beta_max, "0 < beta_min <= beta_max"


@dataclass
class HHTestConfig:
    hh_test: str = "Anthropic/hh-rlhf"  # Hub id, or a local .jsonl/.jsonl.gz file
    split: str = "test"
    data_dirs: list[str] = field(default_factory=list)
    seed: int = 42
    num_sample: int = 500
    max_prompt_length: int = 512
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    do_sample: bool = True
    backend: str = "vllm"  # vllm | transformers
    batch_size: int = 16  # transformers backend
    HH_test_policy_out: str = "eval_outputs/policy_out.jsonl"
    HH_test_base_out: str = "eval_outputs/base_out.jsonl"
    models: dict[str, str] = field(default_factory=dict)  # extra named models -> path

    def _checks(self):
        yield "num_sample", self.num_sample >= 1, "an integer >= 1"
        yield "max_prompt_length", self.max_prompt_length >= 1, "an integer >= 1"
        yield "max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"
        yield "temperature", self.temperature >= 0, "a number >= 0"
        yield "top_p", 0 < self.top_p <= 1, "a number in (0, 1]"
        yield "backend", self.backend in ("vllm", "transformers"), "one of vllm, transformers"
        yield "batch_size", self.batch_size >= 1, "an integer >= 1"
        yield "split", _SPLIT_RE.match(self.split) is not None, "a split like 'test' or 'test[:50%]'"


@dataclass
class VLLMConfig:
    tensor_parallel_size: int = 1
    chunk_size: int = 64  # prompts per generate() call; one atomic write per chunk
    enforce_eager: Optional[bool] = None  # default: True on CPU (torch.compile costs ~1 min)
    gpu_memory_utilization: float = 0.9
    max_model_len: Optional[int] = None
    cpu_kvcache_space_gb: int = 2

    def _checks(self):
        yield "tensor_parallel_size", self.tensor_parallel_size >= 1, "an integer >= 1"
        yield "chunk_size", self.chunk_size >= 1, "an integer >= 1"
        yield "gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "a number in (0, 1]"


@dataclass
class HuggingFaceConfig:
    model_repo: Optional[str] = None
    logs_repo: Optional[str] = None
    private: bool = True


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "hhdpo"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def _checks(self):
        yield "mode", self.mode in ("online", "offline", "disabled"), "one of online, offline, disabled"


@dataclass
class JudgeConfig:
    model: str = "gpt-4o-mini"
    base_url: Optional[str] = None  # any OpenAI-compatible server; None = OpenAI, or a local vLLM judge
    api_key_env: str = "HHDPO_JUDGE_API_KEY"  # env var with the key for a base_url other than api.openai.com; unset = no Authorization header
    api: str = "responses"  # responses | chat
    template: str = "strict"  # strict (seed) | dpo (DPO paper)
    concurrency: int = 16
    max_retries: int = 6
    timeout: float = 60.0
    max_requests: Optional[int] = None  # budget caps: stop cleanly when reached
    max_tokens: Optional[int] = None
    max_output_tokens: int = 512
    temperature: Optional[float] = 0.0  # null = not sent (models that refuse it)
    both_orders: bool = False
    serve_model: str = "smollm2"  # model served locally when no key and no base_url

    def _checks(self):
        yield "base_url", self.base_url is None or re.match(r"^https?://[^/\s]", self.base_url) is not None, \
            "null or an http(s):// URL"
        # OPENAI_API_KEY goes to api.openai.com only, never to another endpoint
        yield "api_key_env", re.match(r"^[A-Za-z_]\w*$", self.api_key_env) is not None \
            and self.api_key_env != "OPENAI_API_KEY", "an environment variable name other than OPENAI_API_KEY"
        yield "api", self.api in ("responses", "chat"), "one of responses, chat"
        yield "template", self.template in ("strict", "dpo"), "one of strict, dpo"
        yield "concurrency", self.concurrency >= 1, "an integer >= 1"
        yield "max_retries", self.max_retries >= 0, "an integer >= 0"
        yield "timeout", self.timeout > 0, "a number > 0"
        yield "max_requests", self.max_requests is None or self.max_requests >= 1, "null or an integer >= 1"
        yield "max_tokens", self.max_tokens is None or self.max_tokens >= 1, "null or an integer >= 1"
        yield "max_output_tokens", self.max_output_tokens >= 1, "an integer >= 1"
        yield "temperature", self.temperature is None or self.temperature >= 0, "null or a number >= 0"


@dataclass
class EvalConfig:
    out_dir: Optional[str] = None  # pairwise, judged and summary files; null = the directory of HH_test_policy_out
    shuffle_ab: bool = True
    seed: int = 0


@dataclass
class Config:
    run_dir: Optional[str] = None  # base of every relative output path (save_dir, checkpoint.dir, tail_test.log_dir, HH_test outputs, eval.out_dir); null = the working directory
    policy_model: str = "smollm2"
    ref_model: Optional[str] = None  # default: policy_model
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    trust_remote_code: bool = False
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    dpo_training: DPOTrainingConfig = field(default_factory=DPOTrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tail_test: TailTestConfig = field(default_factory=TailTestConfig)
    HH_test: HHTestConfig = field(default_factory=HHTestConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    huggingface: HuggingFaceConfig = field(default_factory=HuggingFaceConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def _checks(self):
        yield "precision", self.precision in ("auto", "fp32", "bf16", "fp16"), "one of auto, fp32, bf16, fp16"
        yield "device", self.device in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"
        yield "policy_model", bool(self.policy_model), "a model id or path"

    @property
    def ref_model_path(self) -> str:
        return self.ref_model or self.policy_model

    def to_dict(self) -> dict:
        return _to_yaml_dict(self)


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


_SPLIT_RE = re.compile(r"^[A-Za-z_]+(\[[^\]]*\])?$")
_YAML_KEYS = {"lambda_": "lambda"}  # Python-keyword fields and their YAML spelling
_PY_KEYS = {v: k for k, v in _YAML_KEYS.items()}


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
            value = getattr(obj, _PY_KEYS.get(key, key))
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


def _to_yaml_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_YAML_KEYS.get(f.name, f.name): _to_yaml_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_yaml_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_yaml_dict(v) for k, v in obj.items()}
    return obj


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
    from hhdpo.io import atomic_write_text

    path = Path(directory) / name
    text = config_yaml(cfg)
    if path.is_file():
        changed = _changed_keys(yaml.safe_load(path.read_text()) or {}, yaml.safe_load(text))
        if changed:
            kept = path.with_name(f"{path.stem}.{previous_tag or time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
            os.replace(path, kept)
            if log:
                log(f"[config] changed config {path} (previous one kept as {kept.name}): " + ", ".join(changed))
    atomic_write_text(path, text)
    return path


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
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
        default = cls()
        for f in dataclasses.fields(cls):
            key = prefix + _YAML_KEYS.get(f.name, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            note = f"  # {notes[f.name]}" if f.name in notes else ""
            lines.append(f"  {key} ({_type_name(hints[f.name])}) = {getattr(default, f.name)!r}{note}")

    walk(Config, "")
    return "\n".join(lines)
