"""The context-dependency indicator: appending ``[IND]`` to user turns whose response scored high.

METHOD §3: with threshold β, a user turn whose following assistant response has score ``s > β``
(strictly) gets ``" [IND]"`` appended to its content. The reference code also appends ``"."`` to
every *scored* user turn that ends in a letter or digit; that quirk is available with
``add_period=True`` (off by default).

Choosing what to label: a fixed β (:func:`apply_indicator`), the top fraction F of scored turns
(:func:`top_fraction_labels`: exactly ``round(F·n)`` turns, ties at the boundary broken by position
in the file, earlier first), or the β whose strict rule labels the paper's fraction for a dataset
kind (:func:`threshold_for_fraction` with :data:`PAPER_FRACTIONS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import InputError

INDICATOR = "[IND]"
_SUFFIX = " " + INDICATOR
# METHOD §3: fractions of turns labelled at β = 0.6 in the paper, per instruction dataset
PAPER_FRACTIONS = {"sharegpt": 0.10, "ultrachat": 0.18, "wizardlm": 0.23}


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
                    threshold: float = 0.6, *, add_period: bool = False,
                    labels: Sequence[bool] | None = None) -> list[dict[str, Any]]:
    """A copy of ``messages`` with ``" [IND]"`` appended to each user turn whose response scored > ``threshold``.

    ``scores`` has one entry per assistant message, in order (``None``/NaN = undefined, never
    labelled). ``labels`` (same length), when given, decides instead of the threshold which scored
    turns are labelled. A user turn that already ends with the indicator is not labelled twice.
    """
    out = [dict(m) for m in messages]
    pairs = _response_users(out)
    if scores is None:
        return out
    if len(scores) != len(pairs):
        raise InputError(f"got {len(scores)} scores for {len(pairs)} assistant turns; "
                         "scores must have one entry per assistant message")
    if labels is not None and len(labels) != len(scores):
        raise InputError(f"got {len(labels)} labels for {len(scores)} scores; pass one label per score")
    for j, ((_, user), score) in enumerate(zip(pairs, scores)):
        if user is None or not _defined(score):
            continue
        content = out[user].get("content")
        if not isinstance(content, str):
            continue
        if add_period and content and content[-1].isalnum():
            content += "."
        chosen = bool(labels[j]) if labels is not None else float(score) > threshold
        if chosen and not content.endswith(INDICATOR):
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


def _check_fraction(fraction: float) -> float:
    f = float(fraction)
    if not 0.0 <= f <= 1.0 or math.isnan(f):
        raise InputError(f"target fraction must be in [0, 1], got {fraction!r}; e.g. 0.1 labels the top 10 % of turns")
    return f


def _ranked(score_lists: Sequence[Sequence[float | None] | None]) -> list[tuple[float, int, int]]:
    """Defined scores as (score, row, turn), highest first; ties in file order (earlier row, then turn)."""
    items = [(float(s), i, j) for i, sl in enumerate(score_lists) for j, s in enumerate(sl or []) if _defined(s)]
    return sorted(items, key=lambda t: (-t[0], t[1], t[2]))


@dataclass
class Selection:
    """Which scored turns to label: ``labels[row][turn]``, the β it amounts to, and the counts."""

    labels: list[list[bool]]
    beta: float | None
    labelled: int
    scored: int

    @property
    def fraction(self) -> float:
        return self.labelled / self.scored if self.scored else 0.0


def top_fraction_labels(score_lists: Sequence[Sequence[float | None] | None], fraction: float) -> Selection:
    """Label exactly ``round(fraction · n)`` of the ``n`` scored turns: the highest scores.

    Ties at the boundary are broken by position (earlier rows, then earlier turns, win), so the
    result never depends on anything but the file. ``beta`` is the lowest labelled score (None
    when nothing is labelled).
    """
    f = _check_fraction(fraction)
    ranked = _ranked(score_lists)
    k = min(len(ranked), int(math.floor(f * len(ranked) + 0.5)))
    labels = [[False] * len(sl or []) for sl in score_lists]
    for _, i, j in ranked[:k]:
        labels[i][j] = True
    return Selection(labels, ranked[k - 1][0] if k else None, k, len(ranked))


def threshold_for_fraction(score_lists: Sequence[Sequence[float | None] | None], fraction: float) -> float:
    """The β whose strict rule ``s > β`` labels the top ``round(fraction · n)`` scored turns.

    β is the highest unlabelled score (the (k+1)-th largest); when scores tie at the boundary the
    tied turns all stay unlabelled, so the realised fraction is at most the target. With every
    turn labelled, β is just below the lowest score. Raises ``InputError`` when nothing is scored.
    """
    f = _check_fraction(fraction)
    ranked = _ranked(score_lists)
    if not ranked:
        raise InputError("no scored turn to calibrate a threshold on; run `ctxaware score` first")
    k = min(len(ranked), int(math.floor(f * len(ranked) + 0.5)))
    if k == len(ranked):
        return math.nextafter(ranked[-1][0], -math.inf)
    return ranked[k][0]


def detect_dataset_kind(name: str, rows: Sequence[dict[str, Any]] = ()) -> str | None:
    """The paper's dataset kind (``sharegpt``/``ultrachat``/``wizardlm``) from a file name or the rows' schema.

    The name wins (``ShareGPT_V3...json``, ``ultrachat_200k``, ``WizardLM_evol_instruct``); else
    a ``source`` column naming one kind for every row, or UltraChat-200k's ``prompt_id`` column.
    """
    lowered = str(name).lower().replace("-", "").replace("_", "")
    found = {k for k, key in (("sharegpt", "sharegpt"), ("ultrachat", "ultrachat"), ("wizardlm", "wizard"))
             if key in lowered}
    if len(found) == 1:
        return found.pop()
    if rows:
        sources = {str(r.get("source", "")).lower().replace("-", "").replace("_", "") for r in rows}
        kinds = {detect_dataset_kind(s) for s in sources if s}
        if len(kinds) == 1 and None not in kinds and all(s for s in sources):
            return kinds.pop()
        if all("prompt_id" in r for r in rows):
            return "ultrachat"
    return None
