"""Curves of context awareness during training: the report's reading of ``context_awareness.jsonl``.

``read_monitor(path)`` returns a run's probe records (one per step, in step order; a file holding
probes of several probe configurations keeps the one written last). ``curves(series)`` draws, for
several runs side by side (one line and colour per run), the template gap, the user turn's attention
share (solid: with the template, dashed: without) and the recall of each mode against the training
step; ``section(series)`` is the HTML of it with a table of the values. Used by ``ctxaware report``
for any directory holding the file and by the sft-study page for its two arms.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from ..errors import require

from ..training.probe import MONITOR_FILE  # light: no torch
GAP, SHARE, SHARE_PLAIN = "context/template_gap", "context/user_share/template", "context/user_share/no_template"
RECALL = "context/recall/"


def monitor_path(d: str | Path) -> Path | None:
    """The monitor file of a training run directory, or of its ``model/`` (an sft-study arm); None if neither."""
    for p in (Path(d) / MONITOR_FILE, Path(d) / "model" / MONITOR_FILE):
        if p.is_file():
            return p
    return None


def read_monitor(path: str | Path) -> list[dict[str, Any]]:
    """The probe records of one run (``{"step", "metrics", ...}``), one per step in step order."""
    from ..fsio import read_jsonl

    records = [r for r in read_jsonl(path, what="monitor file") if isinstance(r, dict) and "metrics" in r]
    if not records:
        return []
    ident = records[-1].get("identity")
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("identity") == ident:
            by_step.setdefault(int(r["step"]), r)
    return [by_step[s] for s in sorted(by_step)]


def _points(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r["metrics"][name]) for r in records if name in r["metrics"]]
    return [s for s, _ in rows], [v for _, v in rows]


def curves(series: dict[str, list[dict[str, Any]]]) -> str:
    """Template gap, user share and recall per mode against the step; one colour per run (a data URI)."""
    require("matplotlib", "report")
    from matplotlib.figure import Figure

    from .charts import to_uri

    fig = Figure(figsize=(15.0, 3.8))
    ax_gap, ax_share, ax_rec = fig.subplots(1, 3)
    styles = ["-", "--", ":", "-."]
    for i, (run, records) in enumerate(series.items()):
        color = f"C{i}"
        ax_gap.plot(*_points(records, GAP), "-o", color=color, markersize=4, label=run)
        ax_share.plot(*_points(records, SHARE), "-o", color=color, markersize=4, label=f"{run}, template")
        ax_share.plot(*_points(records, SHARE_PLAIN), "--s", color=color, markersize=3, alpha=0.8,
                      label=f"{run}, no template")
        modes = list(dict.fromkeys(k[len(RECALL):] for r in records for k in r["metrics"] if k.startswith(RECALL)))
        for j, mode in enumerate(modes):
            ax_rec.plot(*_points(records, RECALL + mode), styles[j % len(styles)], marker="o", color=color,
                        markersize=3, label=f"{run}, {mode}")
    ax_gap.axhline(0.0, color="#777777", linewidth=0.8)
    for ax, title, ylabel in ((ax_gap, "template gap (recall without − with template)", "recall difference"),
                              (ax_share, "user turn's share of attention", "share (mean over layers)"),
                              (ax_rec, "NIH recall of the probe per mode", "mean recall")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_rec.set_ylim(-0.05, 1.05)
    return to_uri(fig)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"


def section(series: dict[str, list[dict[str, Any]]], heading: str = "h2") -> str:
    """HTML: the curves and a table of every probe (run, step, gap, user shares, recall per mode)."""
    from .html import _img, _table

    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    modes = list(dict.fromkeys(k[len(RECALL):] for recs in series.values() for r in recs for k in r["metrics"]
                               if k.startswith(RECALL)))
    rows = [[run, r["step"], _fmt(r["metrics"].get(GAP)), _fmt(r["metrics"].get(SHARE)),
             _fmt(r["metrics"].get(SHARE_PLAIN))] + [_fmt(r["metrics"].get(RECALL + m)) for m in modes]
            for run, recs in series.items() for r in recs]
    first = next(iter(series.values()))[0]
    probe = first.get("probe") or {}
    cells = len(first.get("cells") or [])
    about = (f"Each probe: {cells} NIH cells (needle {escape(str(probe.get('needle')))}, lengths "
             f"{escape(str(probe.get('lengths')))}, depths {escape(str(probe.get('depths')))}) per run, answered "
             "greedily by the model being trained, and the attention of the query that predicts the first answer "
             "token on the user turn (mean over layers and heads) with and without the chat template. "
             "A positive template gap means the template costs recall.")
    return (f"<{heading}>Context awareness during training</{heading}><p>{about}</p>"
            + _img(curves(series), "context awareness against the training step")
            + _table(["run", "step", "template gap", "user share, template", "user share, no template"]
                     + [f"recall {m}" for m in modes], rows, "monitor"))


__all__ = ["MONITOR_FILE", "curves", "monitor_path", "read_monitor", "section"]
