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
