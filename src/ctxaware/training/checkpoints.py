"""Resuming training: which ``checkpoint-*`` directories are complete, and the one to resume from.

A ``kill -9`` while the Trainer saves a checkpoint leaves a ``checkpoint-N`` directory that looks
like the others but is not complete. :func:`checkpoint_complete` tells them apart (the Trainer
writes ``trainer_state.json`` last); :func:`resume_checkpoint` maps the recipe's
``resume_from_checkpoint`` (a directory, ``latest`` or ``auto``) onto the newest complete one,
removing newer incomplete ones (the resumed run writes them again).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import ConfigError
from .config import TrainConfig

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_complete(path: str | os.PathLike) -> bool:
    """Whether the Trainer finished writing checkpoint ``path``.

    ``Trainer._save_checkpoint`` writes the weights, optimizer, scheduler and RNG states, and then
    ``trainer_state.json`` last: a checkpoint is complete when that file parses and names the step of
    the directory. A ``kill -9`` during the save leaves the file missing or torn.
    """
    p = Path(path)
    m = _CHECKPOINT.fullmatch(p.name)
    try:
        state = json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return bool(m) and isinstance(state, dict) and state.get("global_step") == int(m.group(1))


def last_complete_checkpoint(output_dir: str | os.PathLike, *, remove_incomplete: bool = False) -> Path | None:
    """The newest complete ``checkpoint-*`` of ``output_dir`` (None if there is none).

    Newer incomplete ones (left by a kill during a save) are skipped with a warning, and deleted when
    ``remove_incomplete`` (the resumed run writes them again from scratch).
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = sorted(((int(m.group(1)), d) for d in out.iterdir()
                    if d.is_dir() and (m := _CHECKPOINT.fullmatch(d.name))), reverse=True)
    for _, d in found:
        if checkpoint_complete(d):
            return d
        logger.warning("%s is incomplete (interrupted while saving)%s", d,
                       ": removed" if remove_incomplete else ": skipped")
        if remove_incomplete:
            shutil.rmtree(d, ignore_errors=True)
    return None


def resume_checkpoint(config: TrainConfig) -> str | None:
    """The checkpoint to resume from: a directory, the newest complete one ('latest'), or that or none ('auto')."""
    value = config.resume_from_checkpoint
    if value in (None, "", False):
        return None
    word = str(value).lower()
    if word in ("latest", "last", "true", "auto"):
        if not config.output_dir:
            config.require_paths()
        out = Path(str(config.output_dir))
        last = last_complete_checkpoint(out, remove_incomplete=True)
        if last is None and word != "auto":
            raise ConfigError(f"resume_from_checkpoint: latest, but {out} holds no checkpoint-* directory that "
                              "finished saving; use --resume-from-checkpoint auto to start from scratch then")
        if last is None:
            logger.info("no complete checkpoint in %s: training from scratch", out)
            return None
        logger.info("resuming from %s", last)
        return str(last)
    if not Path(str(value)).is_dir():
        raise ConfigError(f"checkpoint directory not found: {value}")
    if not checkpoint_complete(value):
        raise ConfigError(f"{value} is an incomplete checkpoint (no valid trainer_state.json: interrupted while "
                          "saving); resume from an earlier one, or use --resume-from-checkpoint latest")
    return str(value)
