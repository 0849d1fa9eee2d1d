"""Scoring instruction datasets by context dependency (METHOD §3) and labelling them with ``[IND]``.

- :class:`Scorer` / :func:`score_conversation` / :class:`ScoringConfig`: per-assistant-turn scores.
- :func:`score_dataset` / :func:`merge_shards`: resumable, shardable dataset scoring.
- :func:`load_conversations`, :func:`read_rows`, :func:`write_rows`, :func:`convert_sharegpt`: dataset IO.
- :data:`INDICATOR`, :func:`apply_indicator`, :func:`strip_indicator`, :func:`label_fractions`: labelling.

Names are imported lazily: the indicator and IO helpers do not pull in torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "INDICATOR": ".indicator", "apply_indicator": ".indicator", "strip_indicator": ".indicator",
    "label_fractions": ".indicator",
    "RowError": ".io", "convert_sharegpt": ".io", "load_conversations": ".io", "read_rows": ".io",
    "row_messages": ".io", "write_rows": ".io",
    "ScoringConfig": ".config",
    "RowScore": ".probe", "Scorer": ".probe", "default_layer": ".probe", "score_conversation": ".probe",
    "ScoreSummary": ".run", "merge_shards": ".run", "parse_shard": ".run", "score_dataset": ".run",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
