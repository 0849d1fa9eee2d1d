"""Resume for ``ctxaware calibrate``: every finished step of the search is kept under ``DIR/cache/``.

A calibration is a sequence of independent, deterministic steps (the head scores of the held-in
prompts, one guard check per candidate, one held-in needle loss and one set of greedy answers per
candidate). Each finished step is written atomically to ``DIR/cache/<step>-<digest>.json``, where
the digest hashes everything the step's numbers depend on: the model and dtype, the held-in cells
(haystack, needle, lengths, depths, reserve, answer budget) or the guard (files, examples, margin),
and the candidate's steering configuration. Rerunning the same command after an interruption
therefore recomputes only the unfinished steps; changing any of those settings misses the cache
instead of reusing stale numbers. ``--no-resume`` ignores (and overwrites) the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ..fsio import atomic_write_json

logger = logging.getLogger(__name__)

#: bump when the meaning of a cached step changes (old entries then miss)
CACHE_VERSION = 1


def digest(key: Any) -> str:
    """A short stable hash of a JSON-serialisable key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


class StepCache:
    """Finished calibration steps under ``directory`` (``enabled=False``: every lookup misses)."""

    def __init__(self, directory: str | Path, *, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def _path(self, step: str, key: Any) -> Path:
        return self.directory / f"{step}-{digest({'v': CACHE_VERSION, 'step': step, 'key': key})}.json"

    def get(self, step: str, key: Any) -> Any:
        """The cached value of ``step`` for ``key``, or ``None`` (also for an unreadable entry)."""
        path = self._path(step, key)
        if self.enabled and path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8"))["value"]
            except (OSError, ValueError, KeyError):
                logger.warning("ignoring unreadable cache entry %s", path)
            else:
                self.hits += 1
                return value
        self.misses += 1
        return None

    def put(self, step: str, key: Any, value: Any) -> Any:
        """Store ``value`` (JSON-serialisable) for ``step`` and ``key``; returns ``value``."""
        atomic_write_json(self._path(step, key), {"step": step, "key": key, "value": value})
        return value

    def fetch(self, step: str, key: Any, compute: Any) -> Any:
        """The cached value, or ``compute()`` stored and returned."""
        value = self.get(step, key)
        return self.put(step, key, compute()) if value is None else value
