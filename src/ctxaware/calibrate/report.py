"""Outputs of a calibration besides the steering file: the search table (CSV + JSON) and its plot.

``search.csv``: one row per candidate (head set, α, heads steered, guard losses and rises, held-in
recall and needle loss). ``search.json``: the same rows, every candidate's held-in answers and the
full ``(layers, heads)`` retrieval-score matrix. ``calibration.png``: the score matrix as a
heatmap beside the held-in needle loss per candidate (guard failures hatched, recall annotated
where measured). matplotlib only for the plot.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from ..fsio import atomic_savefig, atomic_write, atomic_write_json


def write_table(out: Path, cands: Sequence[Any], scores: Any) -> None:
    """Write ``search.csv`` and ``search.json`` into ``out``, each atomically (temp file + fsync + rename)."""
    rows = [c.row() for c in cands]
    cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, list)))  # per-cell: JSON
    with atomic_write(out / "search.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    data = {"rows": rows, "answers": {c.name: c.answers for c in cands},
            "guard": {c.name: c.guard for c in cands}, "head_scores": [[float(v) for v in row] for row in scores]}
    atomic_write_json(out / "search.json", data)


def plot_search(path: Path, cands: Sequence[Any], scores: Any, chosen: str) -> Path:
    """Heatmap of retrieval scores and a bar chart of held-in recall per candidate."""
    from ..errors import require

    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    im = ax0.imshow(scores.numpy().T, aspect="auto", cmap="viridis", origin="lower")
    ax0.set_xlabel("layer")
    ax0.set_ylabel("query head")
    ax0.set_title("attention of the answer query on the needle")
    fig.colorbar(im, ax=ax0, fraction=0.046)
    names = [c.name for c in cands]
    losses = [c.needle_loss for c in cands]
    top = max([v for v in losses if v is not None] or [1.0])
    colors = ["tab:green" if c.name == chosen else ("tab:gray" if not c.steered else
              ("tab:purple" if c.rule == "share" else "tab:blue")) for c in cands]
    bars = ax1.bar(range(len(cands)), [v if v is not None else top * 0.02 for v in losses], color=colors)
    for bar, c in zip(bars, cands):
        if c.needle_loss is None:
            bar.set_hatch("//")
            bar.set_color("tab:red")
        elif c.recall is not None:
            ax1.annotate(f"recall {c.recall:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(range(len(cands)))
    ax1.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax1.set_ylabel("held-in needle loss (nats/token, lower is better)")
    ax1.set_title("candidates (red: refused by the quality guard; green: chosen)")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path
