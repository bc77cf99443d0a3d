"""The config's sections as typed dataclasses: every key, its type, default and meaning.

Each section's ``_checks`` yields (key, ok, expected) for the validation that
:func:`hhdpo.core.config.load_config` runs once at load; the comment beside a field is its
documentation (``hhdpo train --help`` and the README print them via ``config_reference``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

_SPLIT_RE = re.compile(r"^[A-Za-z_]+(\[[^\]]*\])?$")
_YAML_KEYS = {"lambda_": "lambda"}  # Python-keyword fields and their YAML spelling
_PY_KEYS = {v: k for k, v in _YAML_KEYS.items()}


@dataclass
class DatasetConfig:
    dataset_name: str = "Anthropic/hh-rlhf"  # Hub id, a local copy of the Hub repo (DIR/<subset>/{train,test}.jsonl.gz), or one .jsonl/.jsonl.gz file
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
    defer_grad_sync: bool = False  # FSDP: keep gradients unsharded until the last micro-batch, one reduce-scatter per step (every rank holds 4 B x all parameters more: ~32 GB for 8B); false = reduce-scatter every micro-batch
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
    activation_checkpointing: bool = False  # recompute the policy's decoder layers in backward (less activation memory)
    ac_mode: str = "full"  # with activation_checkpointing: full (keep each layer's input only) | selective (op-level: also keep matmul and attention outputs, recompute the element-wise rest)
    compile: bool = False  # torch.compile each decoder layer of the policy and reference (first steps compile: ~1 min)
    group_by_length: Optional[bool] = None  # forward a micro-batch's rows in length-sorted groups (less padding); null = on for one unwrapped process on CPU, else off
    padding_free: Optional[bool] = None  # forward a micro-batch's chosen and rejected rows packed into one row, no padding, each sequence attending only to itself (overrides group_by_length); null = on on CPU and on a GPU whose model runs flash-attention, else off
    share_prompt: Optional[bool] = None  # padding-free with each pair's prompt forwarded once, both responses attending to it (prefix sharing: HH pairs forward 1.5-1.6x fewer tokens); null = on wherever padding_free is and the model does not run flash-attention; true implies padding_free
    logits_chunk_tokens: int = 1024  # LM head over at most this many response tokens at once, recomputed in backward (no [tokens, vocab] fp32 logits); 0 = all at once
    max_tokens_per_micro_batch: int = 0  # 0 = off: batch_size pairs per micro-batch; else each rank forwards its batch_size x gradient_accumulation_steps pairs of a step in micro-batches of at most this many real (unpadded) tokens, prompt+chosen + prompt+rejected per pair (the prompt once with share_prompt; a longer pair alone); steps, LR and resume unchanged
    fsdp: Optional[bool] = None  # shard with FSDP2; null = with more than one rank or bf16 (its mixed precision); true = also one fp32 process (a multi-GPU run's code path on one device)
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
        yield "max_tokens_per_micro_batch", self.max_tokens_per_micro_batch >= 0, "an integer >= 0 (0 = off)"
        yield "share_prompt", not (self.share_prompt and self.padding_free is False), "false or null while padding_free is false (a shared prompt is a padding-free row)"
        yield "logits_chunk_tokens", self.logits_chunk_tokens >= 0, "an integer >= 0 (0 = the whole head at once)"
        yield "ac_mode", self.ac_mode in ("full", "selective"), "one of full, selective"
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
    hh_test: str = "Anthropic/hh-rlhf"  # Hub id, a local copy of the Hub repo (DIR/<subset>/{train,test}.jsonl.gz), or one .jsonl/.jsonl.gz file
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
class SlurmConfig:
    """How ``hhdpo submit`` (submitit) runs the stages; ``slurm/*.sbatch`` takes sbatch options instead."""

    cluster: str = "slurm"  # slurm | local (this machine's processes, no SLURM) | debug (in this process)
    folder: str = "submitit"  # submitit's job pickles and logs, under run_dir
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: int = 60  # minutes per job attempt; a requeued job continues past it
    nodes: int = 1  # training nodes (generation and judging use one)
    tasks_per_node: Optional[int] = None  # training ranks per node; null = gpus_per_node, or 1 without GPUs
    gpus_per_node: int = 0  # training; generation and a local vLLM judge get them too (tensor parallel)
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node, e.g. 64G; null = the partition's default
    signal_delay: int = 300  # seconds before the time limit at which USR2 asks every rank to checkpoint
    max_num_timeout: int = 3  # requeues after a timeout (preemptions are not counted)
    array_parallelism: int = 16  # sweep: training jobs of the array running at once
    extra: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. {mail-type: END, exclusive: ""}

    def _checks(self):
        yield "cluster", self.cluster in ("slurm", "local", "debug"), "one of slurm, local, debug"
        yield "time", self.time >= 1, "minutes, an integer >= 1"
        yield "nodes", self.nodes >= 1, "an integer >= 1"
        yield "tasks_per_node", self.tasks_per_node is None or self.tasks_per_node >= 1, "null or an integer >= 1"
        yield "gpus_per_node", self.gpus_per_node >= 0, "an integer >= 0"
        yield "cpus_per_task", self.cpus_per_task is None or self.cpus_per_task >= 1, "null or an integer >= 1"
        yield "mem", self.mem is None or re.fullmatch(r"\d+[KMGT]?", str(self.mem)) is not None, \
            "null or a size like 64G"
        yield "signal_delay", self.signal_delay >= 1, "seconds, an integer >= 1"
        yield "max_num_timeout", self.max_num_timeout >= 0, "an integer >= 0"
        yield "array_parallelism", self.array_parallelism >= 1, "an integer >= 1"

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1


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
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # hhdpo submit (submitit)

    def _checks(self):
        yield "precision", self.precision in ("auto", "fp32", "bf16", "fp16"), "one of auto, fp32, bf16, fp16"
        yield "device", self.device in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"
        yield "policy_model", bool(self.policy_model), "a model id or path"
        # bf16 training is FSDP2's mixed precision (train.py); precision: auto is only known at run time
        yield ("dpo_training.fsdp", not (self.dpo_training.fsdp is False and self.precision == "bf16"),
               "true or null with precision: bf16 (bf16 training runs through FSDP2's mixed precision)")

    @property
    def ref_model_path(self) -> str:
        return self.ref_model or self.policy_model

    def to_dict(self) -> dict:
        return _to_yaml_dict(self)


def _to_yaml_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_YAML_KEYS.get(f.name, f.name): _to_yaml_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_yaml_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_yaml_dict(v) for k, v in obj.items()}
    return obj
