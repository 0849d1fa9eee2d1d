"""Work split across processes: ``--shard i/n`` specs and the processes of ``accelerate launch`` / ``torchrun``.

:func:`parse_shard` reads ``"i/n"`` (0-based, ``0 <= i < n``), or without a spec the ``RANK`` /
``WORLD_SIZE`` that ``accelerate launch`` and ``torchrun`` set. :class:`Launched` wraps
accelerate's ``PartialState`` (accelerate is imported only here) for runs started by such a
launcher: this process's rank, world size and device, and a barrier.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingDependencyError


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``; ``None`` → from ``RANK``/``WORLD_SIZE`` when launched distributed, else ``(0, 1)``."""
    if spec is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def shard_path(out: str | Path, index: int, count: int) -> Path:
    """``data.jsonl`` → ``data.shard-1-of-4.jsonl`` (``out`` itself for one shard)."""
    p = Path(out)
    return p if count == 1 else p.with_name(f"{p.stem}.shard-{index}-of-{count}{p.suffix}")


def shard_files(out: str | Path) -> list[tuple[int, int, Path]]:
    """The ``(index, count, path)`` of every ``OUT.shard-i-of-n.EXT`` next to ``out``, by count then index."""
    p = Path(out)
    pattern = re.compile(re.escape(p.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(p.suffix) + "$")
    found = []
    for f in p.parent.glob(f"{p.stem}.shard-*-of-*{p.suffix}"):
        m = pattern.fullmatch(f.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), f))
    return sorted(found, key=lambda t: (t[1], t[0]))


def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` / ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


class Launched:
    """The processes of one launch (accelerate's ``PartialState``): rank, world size, device, barrier."""

    def __init__(self) -> None:
        try:
            from accelerate import PartialState
        except ImportError as exc:  # pragma: no cover - accelerate comes with the training extra
            raise MissingDependencyError("runs under a multi-process launcher need accelerate: "
                                         "pip install accelerate") from exc
        import torch

        self.state: Any = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world = int(self.state.process_index), int(self.state.num_processes)
        self.main = bool(self.state.is_main_process)

    @property
    def device(self) -> str:
        return str(self.state.device)

    def barrier(self) -> None:
        """Wait until every process gets here."""
        self.state.wait_for_everyone()
