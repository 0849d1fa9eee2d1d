"""The lost-in-the-middle chart (matplotlib imported here only): accuracy against gold position, one line per mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import require
from ..fsio import atomic_savefig
from .summary import modes_of, summarize

FILENAME = "positions.png"


def positions_figure(records: Sequence[dict[str, Any]], metric: str = "contains", title: str = "") -> Any:
    """One panel per k: ``metric`` (mean over questions and phrasings) against the gold document's position."""
    require("matplotlib", "plot")
    from matplotlib.figure import Figure

    rows = summarize(list(records))["by_position"]
    ks = sorted({r["k"] for r in rows})
    fig = Figure(figsize=(4.8 * len(ks) + 1.5, 3.8))
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    for ax, k in zip(axes, ks):
        for mode in modes_of(records):
            pts = sorted((r["position"], r[metric]) for r in rows if r["k"] == k and r["mode"] == mode)
            if pts:
                ax.plot([p + 1 for p, _ in pts], [v for _, v in pts], marker="o", label=mode)
        ax.set_xlabel(f"position of the gold document (of {k + 1})")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(range(1, k + 2))
        ax.set_title(f"k = {k} distractors", fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_positions(out: str | Path, records: Sequence[dict[str, Any]], metric: str = "contains") -> Path:
    """Write ``DIR/positions.png``; return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = positions_figure(records, metric, f"{records[0].get('model', '')} · multi-document QA")
    FigureCanvasAgg(fig)
    return atomic_savefig(fig, Path(out) / FILENAME, format="png", dpi=120, bbox_inches="tight")
