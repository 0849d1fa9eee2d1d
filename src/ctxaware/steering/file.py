"""Steering files: a :class:`SteeringConfig` plus how it was chosen, as one YAML/JSON file.

``ctxaware calibrate`` writes ``DIR/steering.yaml``; every command that steers reads it with
``--steering FILE`` (``chat``, ``niah``, ``eval``, ``study``, ``serve``), and the Python API with
:func:`load_steering_file`. Layout::

    alpha: 0.8            # SteeringConfig fields, top level
    heads: "3:0,5;7:all"
    emphasis: user
    compounding: none
    calibration:          # optional, free-form: search table, guard, held-in scores, model, ...
      model: embedded
      ...

A plain SteeringConfig YAML (no ``calibration`` key) is a valid steering file too. Unknown
top-level keys are refused by name, as for any config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import read_config_file
from ..errors import ConfigError
from .config import SteeringConfig

META_KEY = "calibration"


def read_steering_file(path: str | Path) -> tuple[SteeringConfig, dict[str, Any]]:
    """``(config, calibration metadata)`` from a steering file; one-line errors for bad files."""
    data = dict(read_config_file(path))
    meta = data.pop(META_KEY, None) or {}
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: '{META_KEY}' must be a mapping, got {type(meta).__name__}")
    try:
        config = SteeringConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config, meta


def load_steering_file(path: str | Path) -> SteeringConfig:
    """The :class:`SteeringConfig` of a steering file (see the module docstring for the layout)."""
    return read_steering_file(path)[0]


def write_steering_file(path: str | Path, config: SteeringConfig, calibration: dict[str, Any] | None = None
                        ) -> Path:
    """Write ``config`` (+ ``calibration`` metadata) atomically as YAML (or JSON for ``.json``)."""
    import yaml

    from ..fsio import atomic_write_text

    p = Path(path)
    data = config.to_dict()
    if calibration:
        data[META_KEY] = calibration
    text = json.dumps(data, indent=2) if p.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    return atomic_write_text(p, text)  # temp file + fsync + rename
