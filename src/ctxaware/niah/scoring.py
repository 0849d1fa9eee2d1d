"""Scoring NIH answers (subword recall) and summarising a grid of results.

The score of one cell follows METHOD §5: lower-case the answer, turn punctuation into spaces,
split on whitespace; recall is the fraction of the needle's keywords present as whole words.
A grid is summarised per mode as the **average recall error** ``1 − mean recall``, the mean recall
per length and the **effective length**: the longest tested length ``L`` such that the mean recall
over depths is at least a threshold (0.85 by default) at every tested length up to ``L`` (None when
the shortest length already falls below it). Cells of tasks with distractors also count how many
answers were ``distracted`` (recalled a distractor's value).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

_PUNCT = re.compile(r"[^\w\s]|_")


def normalize_words(text: str) -> list[str]:
    """Lower-case ``text``, turn punctuation (and ``_``) into spaces and split on whitespace."""
    return _PUNCT.sub(" ", text.lower()).split()


def normalize_keyword(keyword: str) -> str | None:
    """A keyword as scoring compares it: :func:`normalize_words` of it, which must be one word
    (``'Mat.'`` → ``'mat'``); ``None`` when it is empty or more than one word. Needle validation and
    :func:`recall` both use this, so a keyword that passes validation can always score."""
    words = normalize_words(keyword) if isinstance(keyword, str) else []
    return words[0] if len(words) == 1 else None


def recall(answer: str, keywords: Sequence[str]) -> float:
    """Fraction of ``keywords`` that occur as whole words in ``answer`` (0.0 when no keywords).

    Answer and keywords go through the same normaliser (:func:`normalize_words`,
    :func:`normalize_keyword`); a keyword that is not one word after it never matches.
    """
    if not keywords:
        return 0.0
    words = set(normalize_words(answer))
    return sum(1 for k in keywords if normalize_keyword(k) in words) / len(keywords)


def found_keywords(answer: str, keywords: Sequence[str]) -> list[str]:
    """The ``keywords`` (as given) that occur as whole words in ``answer``, in their order."""
    words = set(normalize_words(answer))
    return [k for k in keywords if normalize_keyword(k) in words]


def recall_by_length(rows: Iterable[dict[str, Any]]) -> dict[int, float]:
    """Mean recall over depths per context length, ascending (rows without a length are left out)."""
    by_len: dict[int, list[float]] = defaultdict(list)
    for r in (r for r in rows if "length" in r):
        by_len[int(r["length"])].append(float(r["recall"]))
    return {L: sum(v) / len(v) for L, v in sorted(by_len.items())}


def effective_length(rows: Iterable[dict[str, Any]], threshold: float = 0.85) -> int | None:
    """The longest tested length ``L`` with mean recall >= ``threshold`` at every tested length <= ``L``;
    None when the shortest tested length is already below ``threshold`` (or there are no rows)."""
    best = None
    for length, mean in recall_by_length(rows).items():
        if mean < threshold:
            break
        best = length
    return best


def summarize(records: Iterable[dict[str, Any]], modes: Sequence[str] | None = None, *,
              threshold: float = 0.85) -> dict[str, dict[str, Any]]:
    """Per mode: number of cells, mean recall, average recall error, mean prompt length, mean recall per
    length and effective length at ``threshold`` (and distracted cells, for tasks with distractors)."""
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_mode[r["mode"]].append(r)
    order = list(modes) if modes else sorted(by_mode)
    out: dict[str, dict[str, Any]] = {}
    for mode in order:
        rows = by_mode.get(mode, [])
        if not rows:
            continue
        mean = sum(r["recall"] for r in rows) / len(rows)
        out[mode] = {
            "cells": len(rows),
            "mean_recall": mean,
            "avg_recall_error": 1.0 - mean,
            "perfect_cells": sum(1 for r in rows if r["recall"] >= 1.0),
            "mean_tokens": sum(r["tokens"] for r in rows) / len(rows),
            "seconds": sum(r.get("seconds", 0.0) for r in rows),
            "recall_by_length": {str(L): v for L, v in recall_by_length(rows).items()},
            "effective_length": effective_length(rows, threshold),
        }
        if any("distracted" in r for r in rows):
            out[mode]["distracted_cells"] = sum(1 for r in rows if r.get("distracted"))
        if any("truncated" in r for r in rows):  # answers cut by max_new_tokens (records since the flag exists)
            out[mode]["truncated_cells"] = sum(1 for r in rows if r.get("truncated"))
            out[mode]["longest_answer_tokens"] = max(int(r.get("answer_tokens") or 0) for r in rows)
    return out


def _effective(s: dict[str, Any]) -> str:
    if "effective_length" not in s:
        return "–"
    return "none" if s["effective_length"] is None else str(s["effective_length"])


def format_table(summary: dict[str, dict[str, Any]], *, markdown: bool = False) -> str:
    """The summary as a text (or Markdown) table, one row per mode."""
    head = ["mode", "cells", "avg recall error", "mean recall", "cells with recall 1", "effective length",
            "seconds"]
    rows = [[m, str(s["cells"]), f"{s['avg_recall_error']:.3f}", f"{s['mean_recall']:.3f}",
             f"{s['perfect_cells']}/{s['cells']}", _effective(s), f"{s['seconds']:.0f}"] for m, s in summary.items()]
    if any("distracted_cells" in s for s in summary.values()):
        head.insert(5, "distracted")
        for row, s in zip(rows, summary.values()):
            row.insert(5, f"{s.get('distracted_cells', 0)}/{s['cells']}")
    if any(s.get("truncated_cells") for s in summary.values()):
        head.insert(len(head) - 1, "cut by budget")
        for row, s in zip(rows, summary.values()):
            row.insert(len(row) - 1, f"{s.get('truncated_cells', 0)}/{s['cells']}")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])
