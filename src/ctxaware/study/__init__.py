"""The study: one diagnosis of a chat model — NIH modes, attention by role, optional QA — and its report.

``run_study(StudyConfig(model=...))`` writes ``DIR/niah``, ``DIR/attention/attention.json``,
``DIR/qa/*`` and ``DIR/report.html``; see :mod:`ctxaware.study.runner` for the layout.
"""

from __future__ import annotations

from .config import STUDY_MODES, StudyConfig
from .runner import StudyRun, run_study

__all__ = ["STUDY_MODES", "StudyConfig", "StudyRun", "run_study"]
