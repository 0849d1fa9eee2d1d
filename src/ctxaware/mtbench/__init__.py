"""MT-Bench next to context awareness: two-turn answers judged by any OpenAI-compatible model.

* :class:`MtBenchConfig` — model, condition (template, ``[IND]``, steering, adapter), data, judge;
* :func:`run_mtbench` — generate, judge (concurrently, with retries), summarise; resumable files in
  ``DIR`` (``answers.jsonl``, ``judgments.jsonl``, ``summary.json``); returns :class:`MtBenchRun`;
* :func:`read_mtbench` — the summaries of every (model, condition, judge) of a directory (the report);
* :mod:`.data` (FastChat's questions, judge prompts and references), :mod:`.judge` (the HTTP client).

The judge client needs httpx: ``pip install 'ctxaware[mtbench]'``. See ``docs/mtbench.md``.
"""

from __future__ import annotations

from .config import MtBenchConfig, condition_name
from .data import Question, load_data
from .judge import JudgeClient, JudgeError, parse_rating
from .runner import MtBenchRun, check_judge, format_summary, read_mtbench, run_mtbench, summarize

__all__ = ["JudgeClient", "JudgeError", "MtBenchConfig", "MtBenchRun", "Question", "check_judge", "condition_name",
           "format_summary", "load_data", "parse_rating", "read_mtbench", "run_mtbench", "summarize"]
