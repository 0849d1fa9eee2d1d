"""The context-dependency indicator: appending ``[IND]`` to user turns whose response scored high.

METHOD §3: with threshold β, a user turn whose following assistant response has score ``s > β``
(strictly) gets ``" [IND]"`` appended to its content. The reference code also appends ``"."`` to
every *scored* user turn that ends in a letter or digit; that quirk is available with
``add_period=True`` (off by default).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from ..errors import InputError

INDICATOR = "[IND]"
_SUFFIX = " " + INDICATOR


def _defined(score: Any) -> bool:
    return isinstance(score, (int, float)) and not isinstance(score, bool) and not math.isnan(score)


def _response_users(messages: Sequence[dict[str, Any]]) -> list[tuple[int, int | None]]:
    """For each assistant message (in order): its index and the index of the user turn it answers."""
    out, last_user = [], None
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "user":
            last_user = i
        elif role == "assistant":
            out.append((i, last_user))
            last_user = None
    return out


def apply_indicator(messages: Sequence[dict[str, Any]], scores: Sequence[float | None] | None,
                    threshold: float = 0.6, *, add_period: bool = False) -> list[dict[str, Any]]:
    """A copy of ``messages`` with ``" [IND]"`` appended to each user turn whose response scored > ``threshold``.

    ``scores`` has one entry per assistant message, in order (``None``/NaN = undefined, never
    labelled). A user turn that already ends with the indicator is not labelled twice.
    """
    out = [dict(m) for m in messages]
    pairs = _response_users(out)
    if scores is None:
        return out
    if len(scores) != len(pairs):
        raise InputError(f"got {len(scores)} scores for {len(pairs)} assistant turns; "
                         "scores must have one entry per assistant message")
    for (_, user), score in zip(pairs, scores):
        if user is None or not _defined(score):
            continue
        content = out[user].get("content")
        if not isinstance(content, str):
            continue
        if add_period and content and content[-1].isalnum():
            content += "."
        if float(score) > threshold and not content.endswith(INDICATOR):
            content += _SUFFIX
        out[user]["content"] = content
    return out


def strip_indicator(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of ``messages`` with a trailing indicator removed from every user turn."""
    out = []
    for m in messages:
        m = dict(m)
        content = m.get("content")
        if m.get("role") == "user" and isinstance(content, str) and content.endswith(INDICATOR):
            m["content"] = content[: -len(INDICATOR)].rstrip(" ")
        out.append(m)
    return out


def label_fractions(score_lists: Iterable[Sequence[float | None] | None],
                    thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8)) -> dict[float, dict[str, float]]:
    """Per threshold: the fraction of scored turns above it (``turns``) and of rows with one such turn (``rows``)."""
    lists = [[float(s) for s in (sl or []) if _defined(s)] for sl in score_lists]
    n_turns = sum(len(sl) for sl in lists)
    n_rows = sum(1 for sl in lists if sl)
    out = {}
    for t in thresholds:
        turns = sum(1 for sl in lists for s in sl if s > t)
        rows = sum(1 for sl in lists if any(s > t for s in sl))
        out[t] = {"turns": turns / n_turns if n_turns else 0.0, "rows": rows / n_rows if n_rows else 0.0}
    return out
