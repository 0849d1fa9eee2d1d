"""Multi-document QA summaries: accuracy per (mode, k, gold position), pooled and per phrasing; summary files.

Metrics: ``contains`` (a gold answer occurs in the short answer, the repository's QA metric),
``exact_match`` and ``f1`` (SQuAD's); ``truncated`` counts answers cut by the token budget.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from ..fsio import atomic_write_json, atomic_write_text

METRICS = ("contains", "exact_match", "f1")
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"


def _mean(rows: list[dict[str, Any]], metric: str) -> float:
    return sum(float(r[metric]) for r in rows) / len(rows)


def _row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(rows), **{m: _mean(rows, m) for m in METRICS},
            "truncated": sum(1 for r in rows if r.get("truncated"))}


def modes_of(records: Iterable[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["mode"] for r in records))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"by_position": [...], "by_phrasing": [...], "modes": {mode: pooled row}}``: every row holds ``n``, the
    mean of each metric and the number of truncated answers."""
    pos: dict[tuple, list] = defaultdict(list)
    phr: dict[tuple, list] = defaultdict(list)
    mode_rows: dict[str, list] = defaultdict(list)
    for r in records:
        pos[(r["mode"], r["k"], r["position"])].append(r)
        phr[(r["mode"], r["k"], r["position"], r["phrasing"])].append(r)
        mode_rows[r["mode"]].append(r)
    order = {m: i for i, m in enumerate(modes_of(records))}
    return {
        "by_position": [{"mode": m, "k": k, "position": p, **_row(v)}
                        for (m, k, p), v in sorted(pos.items(), key=lambda t: (order[t[0][0]], t[0][1], t[0][2]))],
        "by_phrasing": [{"mode": m, "k": k, "position": p, "phrasing": ph, **_row(v)}
                        for (m, k, p, ph), v in sorted(phr.items(), key=lambda t: (order[t[0][0]], *t[0][1:]))],
        "modes": {m: _row(mode_rows[m]) for m in order},
    }


def position_rows(summary: dict[str, Any], metric: str = "contains") -> tuple[list[str], list[list[str]]]:
    """Head and rows: one row per (mode, k), one column per gold position (1-based), then the mean over positions."""
    rows: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in summary["by_position"]:
        rows[(r["mode"], r["k"])][r["position"]] = r[metric]
    positions = sorted({p for v in rows.values() for p in v})
    head = ["mode", "k"] + [f"gold {p + 1}" for p in positions] + ["mean"]
    return head, [[mode, str(k)] + [f"{v[p]:.2f}" if p in v else "–" for p in positions]
                  + [f"{sum(v.values()) / len(v):.3f}"] for (mode, k), v in rows.items()]


def table(summary: dict[str, Any], metric: str = "contains") -> str:
    """:func:`position_rows` as a Markdown table."""
    head, rows = position_rows(summary, metric)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def write_summary(out: str | Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md`` (the position tables for each metric); return the summary."""
    out = Path(out)
    summary = summarize(records)
    atomic_write_json(out / SUMMARY_JSON, summary)
    md = [f"# Multi-document QA: {records[0].get('model', '?') if records else '?'}", ""]
    for metric in METRICS:
        md += [f"## {metric} by gold position", "", table(summary, metric), ""]
    cut = {m: v["truncated"] for m, v in summary["modes"].items() if v["truncated"]}
    if cut:
        md.append("Answers cut by the token budget: " + ", ".join(f"{m} {n}" for m, n in cut.items()) + ".")
    atomic_write_text(out / SUMMARY_MD, "\n".join(md) + "\n")
    return summary
