"""NIH heatmaps (matplotlib is imported here only): one per mode, and a side-by-side comparison.

Each heatmap is the classic needle-in-a-haystack figure: depth (%) down, context length across,
recall coloured from red (0) through yellow to green (1), with each cell annotated. The figures
are pure functions of the result records, so ``ctxaware niah plot DIR`` redraws them at any time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, require
from ..fsio import atomic_savefig
from .results import read_records

COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # red -> yellow -> green, as in the classic NIH figure


def _grid(records: Sequence[dict[str, Any]], mode: str):
    rows = [r for r in records if r["mode"] == mode]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    values = [[float("nan")] * len(lengths) for _ in depths]
    for r in rows:
        values[depths.index(r["depth"])][lengths.index(r["length"])] = r["recall"]
    return lengths, depths, values


def _truncated(records: Sequence[dict[str, Any]], mode: str) -> set[tuple[float, int]]:
    """(depth, length) of the mode's cells whose answer stopped at max_new_tokens."""
    return {(r["depth"], r["length"]) for r in records if r["mode"] == mode and r.get("truncated")}


def _draw(ax: Any, cmap: Any, records: Sequence[dict[str, Any]], mode: str, annotate: bool) -> Any:
    import numpy as np

    lengths, depths, values = _grid(records, mode)
    data = np.array(values, dtype=float)
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(v) for v in lengths], rotation=45 if len(lengths) > 8 else 0)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    err = 1.0 - float(np.nanmean(data)) if np.isfinite(data).any() else float("nan")
    cut = _truncated(records, mode)
    ax.set_title(f"{mode}  (avg recall error {err:.3f})" + (f"\n* {len(cut)} answer(s) cut by the token budget"
                                                            if cut else ""), fontsize=10)
    if annotate:
        size = 8 if len(lengths) <= 10 else 5
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if np.isfinite(data[i, j]):
                    mark = "*" if (depths[i], lengths[j]) in cut else ""
                    ax.text(j, i, (f"{data[i, j]:.2f}".rstrip("0").rstrip(".") if data[i, j] not in (0, 1)
                                   else f"{data[i, j]:.0f}") + mark, ha="center", va="center", fontsize=size,
                            color="black")
    return im


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_savefig(fig, path, format="png", dpi=120, bbox_inches="tight")  # temp + fsync + rename


def _slug(mode: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", mode).strip("_")


def plot_results(out: str | Path, records: Sequence[dict[str, Any]] | None = None,
                 modes: Sequence[str] | None = None, *, annotate: bool = True) -> list[Path]:
    """Write ``heatmap_<mode>.png`` per mode and ``heatmap_comparison.png`` into ``out``; return the paths."""
    require("matplotlib", "plot")
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = list(records) if records is not None else read_records(out)
    if not records:
        raise InputError(f"no NIH results to plot in {out}")
    present = list(dict.fromkeys(r["mode"] for r in records))
    modes = [m for m in (modes or present) if m in present]
    cmap = LinearSegmentedColormap.from_list("niah", list(COLORS))
    title = f"{records[0].get('model', '')} · needle {records[0].get('needle', '')}"
    paths = []
    for mode in modes:
        lengths, depths, _ = _grid(records, mode)
        fig = Figure(figsize=(max(5.0, 0.55 * len(lengths) + 2.5), max(3.5, 0.32 * len(depths) + 1.8)))
        ax = fig.add_subplot()
        im = _draw(ax, cmap, records, mode, annotate)
        fig.colorbar(im, ax=ax, label="recall")
        fig.suptitle(title, fontsize=9)
        paths.append(_save(fig, out / f"heatmap_{_slug(mode)}.png"))
    paths.append(_save(comparison_figure(records, modes, title, annotate=annotate), out / "heatmap_comparison.png"))
    return paths


def comparison_figure(records: Sequence[dict[str, Any]], modes: Sequence[str], title: str = "", *,
                      annotate: bool = True) -> Any:
    """One matplotlib Figure with the heatmap of every mode side by side (shared colour bar)."""
    require("matplotlib", "plot")
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    cmap = LinearSegmentedColormap.from_list("niah", list(COLORS))
    n = len(modes)
    lengths, depths, _ = _grid(records, modes[0])
    width = max(4.5, 0.5 * len(lengths) + 2.0)
    fig = Figure(figsize=(width * n + 1.2, max(3.5, 0.32 * len(depths) + 1.8)))
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    im = None
    for ax, mode in zip(axes, modes):
        im = _draw(ax, cmap, records, mode, annotate)
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.colorbar(im, ax=list(axes), label="recall", fraction=0.03)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
