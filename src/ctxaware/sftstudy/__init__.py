"""Vanilla vs conditional instruction fine-tuning in one run (the paper's Table 3), and its report.

``run_sft_study(SftStudyConfig(dataset=..., out=DIR))`` scores the data with a probe, labels it with
``[IND]``, trains a ``vanilla`` and a ``conditional`` arm from the same base with the same recipe,
evaluates both (NIH, QA, attention, optional MT-Bench) and writes ``DIR/report.html``; see
:mod:`ctxaware.sftstudy.runner` for the layout. Imported lazily: torch loads when a stage runs.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "SftStudyConfig": "ctxaware.sftstudy.config",
    "SftStudyRun": "ctxaware.sftstudy.runner",
    "run_sft_study": "ctxaware.sftstudy.runner",
    "write_report": "ctxaware.sftstudy.report",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
