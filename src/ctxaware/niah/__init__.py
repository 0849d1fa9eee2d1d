"""Needle-in-a-haystack study (METHOD §5): config and presets, haystacks, needles, runner, scoring, plots.

``run_niah(NiahConfig.from_preset("quick"))`` runs the quick grid on the embedded model; results
land in ``config.out`` as ``results.jsonl`` (resumable), ``manifest.json``, ``summary.{json,md}``
and heatmap PNGs. matplotlib is needed only for the plots (:mod:`ctxaware.niah.plot`).
"""

from __future__ import annotations

from .config import PRESETS, NiahConfig, canonical_mode, parse_mode, preset_values
from .haystack import Haystack, HaystackText, context_budget, read_haystack
from .needles import NEEDLES, Needle, load_needle
from .results import read_records, write_summary
from .runner import NiahRun, run_niah
from .scoring import format_table, normalize_words, recall, summarize

__all__ = [
    "NEEDLES", "PRESETS", "Haystack", "HaystackText", "Needle", "NiahConfig", "NiahRun", "canonical_mode",
    "context_budget", "format_table", "load_needle", "normalize_words", "parse_mode", "preset_values",
    "read_haystack", "read_records", "recall", "run_niah", "summarize", "write_summary",
]
