"""The report: result directories → one self-contained HTML page (``build_report(dirs, out)``).

Reads study, NIH, attention, eval and calibration outputs (:mod:`.load`), states the verdict
with its numbers (:mod:`.verdict`), draws inline PNGs (:mod:`.charts`) and writes the page
(:mod:`.html`) atomically. Several models found in the directories are shown side by side.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from ..fsio import atomic_write_text
from .load import ModelResults, load_results
from .verdict import Finding, niah_findings

__all__ = ["Finding", "ModelResults", "build_report", "load_results", "niah_findings"]


def build_report(dirs: Iterable[str | Path], out: str | Path) -> Path:
    """Write the report of ``dirs`` to ``out`` and return its path."""
    from .html import render_page

    models = load_results(list(dirs))
    page = render_page(models, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return atomic_write_text(Path(out), page)  # temp file + fsync + rename
