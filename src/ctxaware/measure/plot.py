"""Line plot of the attention share of each role across layers (matplotlib, imported here only)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..errors import require
from ..fsio import atomic_savefig

_STYLES = ("-", "--", ":", "-.")
_COLOURS = {"system": "tab:purple", "user": "tab:green", "assistant": "tab:blue", "template": "tab:gray"}


def plot_role_shares(series: Mapping[str, Mapping[str, Sequence[float]]], layers: Sequence[int],
                     path: str | Path, *, title: str | None = None) -> Path:
    """One line per role across ``layers``; each entry of ``series`` (e.g. "template", "no template")
    gets its own line style. ``series[label][role]`` is the per-layer share. Returns the path."""
    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, shares) in enumerate(series.items()):
        for role, values in shares.items():
            ax.plot(list(layers), list(values), _STYLES[i % len(_STYLES)], color=_COLOURS.get(role),
                    label=f"{role} ({label})" if len(series) > 1 else role)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention share")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, Path(path), dpi=120)  # temp file + fsync + rename
    finally:
        plt.close(fig)
