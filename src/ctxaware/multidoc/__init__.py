"""Multi-document QA by the position of the gold document ("lost in the middle"): ``ctxaware multidoc``.

Each SQuAD-format question gets its gold paragraph plus ``k`` distractor paragraphs from other
articles (seeded, never containing a gold answer); the gold one goes at each tested position, the
distractors keep their order, and every prompt is answered in every mode. Results per (mode, k,
position, phrasing) are resumable and shardable like NIH cells (``ctxaware.niah.results.ResultStore``,
``ctxaware.niah.engine.GreedyEngine``).
"""

from __future__ import annotations

from .config import MultidocConfig
from .runner import MultidocRun, run_multidoc

__all__ = ["MultidocConfig", "MultidocRun", "run_multidoc"]
