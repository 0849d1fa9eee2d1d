"""Building argparse options from config dataclasses, so help text is written once.

``add_config_options(parser, Config)`` adds one ``--option`` per dataclass field (help, choices and
type taken from the field); ``config_from_args(Config, args)`` builds the config from defaults, then
an optional ``--config FILE`` (YAML/JSON), then the options given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from ..config import read_config_file
from ..errors import ConfigError

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """The scalar type behind ``X | None`` / ``Optional[X]``; lists and dicts are read as strings."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if tp in (bool, int, float, str):
        return tp
    return str


def _option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (),
                       rename: dict[str, str] | None = None) -> None:
    """Add one option per CLI-visible field of dataclass ``cls`` (defaults stay in the dataclass)."""
    hints = typing.get_type_hints(cls)
    rename = rename or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata or {}
        if f.name in exclude or not meta.get("cli", True):
            continue
        help_text = meta.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and default != "" and not isinstance(default, bool):
            help_text += f" (default: {default})"
        kind = _base_type(hints[f.name])
        flag = rename.get(f.name, _option_name(f.name))
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text + (f" (default: {'on' if default else 'off'})"))
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, choices=meta.get("choices"),
                                metavar=meta.get("metavar"), help=help_text)


def config_from_args(cls: type[T], args: argparse.Namespace, *, base: dict[str, Any] | None = None,
                     **overrides: Any) -> T:
    """Defaults < ``base`` < ``--config`` file < explicit options < ``overrides``."""
    values: dict[str, Any] = dict(base or {})
    config_file = getattr(args, "config", None)
    if config_file:
        values.update({k.replace("-", "_"): v for k, v in read_config_file(config_file).items()})
    names = {f.name for f in dataclasses.fields(cls)}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    values.update(overrides)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) for {cls.__name__} in {config_file or 'config'}: {', '.join(unknown)}")
    return cls(**values)


MODEL_OPTIONS = ("model", "device", "dtype", "device_map", "attn_implementation", "trust_remote_code")


def add_model_options(parser: argparse.ArgumentParser | Any, *, tokenizer_only: bool = False,
                      model_help: str | None = None) -> None:
    """The one set of model options every command that loads a model shares (same names and defaults):
    ``--model``, ``--device``, ``--dtype``, ``--device-map``, ``--attn-implementation``,
    ``--trust-remote-code``; ``tokenizer_only`` keeps ``--model`` and ``--trust-remote-code``."""
    from ..models import _DTYPES

    group = parser.add_argument_group("model") if hasattr(parser, "add_argument_group") else parser
    group.add_argument("--model", default=None, help=model_help or "HF id, local directory or .gguf file "
                       "(default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--trust-remote-code", action="store_true", default=False,
                       help="run the model repository's own Python code (off by default)")
    if tokenizer_only:
        return
    group.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1, mps "
                       "(default: cuda, then mps, when present; else cpu)")
    group.add_argument("--dtype", default="auto", choices=_DTYPES,
                       help="weights dtype; auto = bfloat16 where the hardware computes it fast (CUDA GPUs "
                            "with bf16, CPUs with AMX/AVX512-BF16), else float32 (default: auto; float32 for "
                            "exact comparisons)")
    group.add_argument("--device-map", default=None, metavar="MAP",
                       help="place layers across devices through accelerate: auto, balanced, sequential or a "
                            "JSON object {module: device}, for models larger than one device (default: none)")
    group.add_argument("--attn-implementation", default=None, metavar="NAME",
                       help="attention implementation: sdpa, eager, flex_attention, flash_attention_2, ... "
                            "(default: the model's own; Gemma-2 gets eager)")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``load_model`` keyword arguments (without the name) from :func:`add_model_options` options."""
    out: dict[str, Any] = {"trust_remote_code": bool(getattr(args, "trust_remote_code", False))}
    for name in ("device", "dtype", "device_map", "attn_implementation"):
        if hasattr(args, name):
            out[name] = getattr(args, name)
    return out


def steering_base(path: str | None) -> dict[str, Any] | None:
    """The SteeringConfig fields of a ``--steering FILE`` (the base that other options override)."""
    if not path:
        return None
    from ..steering.file import load_steering_file

    return load_steering_file(path).to_dict()
