"""Config dataclasses shared by the library and the CLI.

Every config is a dataclass whose fields carry ``metadata={"help": ...}``; that help text is reused
verbatim by the CLI (see :mod:`ctxaware.cli.options`). :class:`ConfigMixin` gives each config a
round trip to dict / YAML / JSON files, with unknown keys rejected by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, InputFileNotFoundError

T = TypeVar("T", bound="ConfigMixin")


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
          choices: tuple | None = None, metavar: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with CLI help (and optional choices/metavar) in its metadata."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def device_map_field() -> Any:
    """The ``device_map`` field of every config whose run loads a model (same help everywhere)."""
    return field(None, metavar="MAP", help="place layers across devices through accelerate: auto, balanced, "
                 "sequential or a JSON object (default: none)")


def attn_implementation_field() -> Any:
    """The ``attn_implementation`` field of every config whose run loads a model."""
    return field(None, metavar="NAME", help="attention implementation (sdpa, eager, flex_attention, ...; "
                 "default: the model's own)")


def trust_remote_code_field() -> Any:
    """The ``trust_remote_code`` field of every config whose run loads a model."""
    return field(False, help="run the model repository's own Python code (off by default)")


def load_kwargs(cfg: Any) -> dict[str, Any]:
    """``load_model`` keyword arguments (without the name) from a config with ``dtype``, ``device`` and
    the three fields above."""
    return {"dtype": cfg.dtype, "device": cfg.device, "device_map": cfg.device_map,
            "attn_implementation": cfg.attn_implementation, "trust_remote_code": cfg.trust_remote_code}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping from ``path``; one-line errors for missing or malformed files."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputFileNotFoundError(f"config file not found: {path}")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid UTF-8 at byte {exc.start}; re-save the file as UTF-8") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".ndjson", ".csv", ".txt", ".yaml", ".yml")


def check_local_input(value: str | Path | None, what: str) -> None:
    """Refuse, before any work, a value that names a local file (a data-file suffix, a path separator or a leading
    ``.``/``~``) that does not exist; other values (Hugging Face dataset names) pass."""
    if not value:
        return
    text = str(value)
    path = Path(text).expanduser()
    local = path.suffix.lower() in DATA_SUFFIXES or text.startswith((".", "/", "~")) or "/" in text and path.parent.exists()
    if local and not path.exists():
        raise InputFileNotFoundError(f"{what} not found: {text}")


def _numbers(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Values from a file for fields whose default is a number, as numbers: ``"2e-4"`` → 2e-4; a value that is no
    number is a one-line :class:`ConfigError` naming the field (never a TypeError deep inside a run)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    out = dict(data)
    for k, v in data.items():
        d = defaults.get(k)
        if isinstance(d, bool) or not isinstance(d, (int, float)) or v is None or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            continue
        try:
            num = float(v)
            out[k] = int(num) if isinstance(d, int) and num.is_integer() else num
        except (TypeError, ValueError):
            raise ConfigError(f"{k} must be a number, got {v!r}") from None
    return out


class ConfigMixin:
    """Round trip of a config dataclass to dicts and YAML/JSON files."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = set(cls.field_names())
        unknown = [k for k in data if k.replace("-", "_") not in names]
        if unknown:
            import difflib

            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else repr(k)
                     for k in unknown]
            raise ConfigError(f"unknown {cls.__name__} option(s): {', '.join(hints)}")
        return cls(**_numbers(cls, {k.replace("-", "_"): v for k, v in data.items()}))  # type: ignore[call-arg]

    @classmethod
    def from_file(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(read_config_file(path))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if p.suffix == ".json" else self.to_yaml()
        from .fsio import atomic_write_text

        atomic_write_text(p, text)  # temp file + fsync + rename: never a half-written config

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
