"""The report's figures as inline PNGs (matplotlib, Agg canvas; imported only here and in niah.plot).

Each function returns a ``data:image/png;base64,...`` URI, so the page needs no other file.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Sequence

from ..errors import require

ROLE_COLORS = {"user": "#1f77b4", "template": "#ff7f0e", "assistant": "#2ca02c", "bos": "#7f7f7f",
               "system": "#9467bd"}


def to_uri(fig: Any) -> str:
    """Render a matplotlib Figure to a base64 PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heatmaps(records: Sequence[dict[str, Any]], modes: Sequence[str], title: str) -> str:
    """Depth × length heatmaps of every mode, side by side."""
    from ..niah.plot import comparison_figure

    return to_uri(comparison_figure(records, modes, title))


def recall_vs_length(series: dict[str, Sequence[dict[str, Any]]], modes: Sequence[str], *,
                     threshold: float | None = None) -> str:
    """Mean recall per context length, one line per mode; one panel per model (or model and task) in
    ``series``; with ``threshold``, its horizontal line (the effective length's criterion)."""
    require("matplotlib", "report")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(series), 3.6))
    axes = fig.subplots(1, len(series), squeeze=False, sharey=True)[0]
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]
    for ax, (model, records) in zip(axes, series.items()):
        all_lengths = sorted({r["length"] for r in records}) or [0]
        # modes that score the same would hide each other: each gets its own marker and dash and a
        # small sideways offset (a fraction of the smallest gap between lengths)
        gap = min([b - a for a, b in zip(all_lengths, all_lengths[1:])] or [max(all_lengths[0], 1)])
        for i, mode in enumerate(modes):
            rows = [r for r in records if r["mode"] == mode]
            if not rows:
                continue
            lengths = sorted({r["length"] for r in rows})
            means = [sum(r["recall"] for r in rows if r["length"] == L) / sum(1 for r in rows if r["length"] == L)
                     for L in lengths]
            shift = (i - (len(modes) - 1) / 2) * 0.04 * gap
            marker, dash = styles[i % len(styles)]
            ax.plot([L + shift for L in lengths], means, marker=marker, linestyle=dash, alpha=0.85, label=mode)
        if threshold is not None:
            ax.axhline(threshold, color="#555555", linestyle=(0, (4, 3)), linewidth=1.0,
                       label=f"threshold {threshold:g}")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean recall over depths")
    axes[-1].legend(fontsize=8, loc="lower left")
    return to_uri(fig)


def attention_roles(att: dict[str, Any], title: str) -> str:
    """Per-layer share of each role (stacked), one panel per condition, and the retrieval head's bars."""
    require("matplotlib", "report")
    from matplotlib.figure import Figure

    conds = att["conditions"]
    fig = Figure(figsize=(4.6 * len(conds) + 3.6, 3.6))
    axes = fig.subplots(1, len(conds) + 1, squeeze=False)[0]
    for ax, (cond, data) in zip(axes, conds.items()):
        shares = data["shares"]
        roles = [r for r in shares if any(v > 0 for v in shares[r])]
        layers = list(range(len(next(iter(shares.values())))))
        ax.stackplot(layers, [shares[r] for r in roles], labels=roles,
                     colors=[ROLE_COLORS.get(r, "#cccccc") for r in roles], alpha=0.85)
        ax.set_xlim(0, max(1, len(layers) - 1))
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of attention")
        ax.set_title(f"{cond.replace('_', ' ')} (mean over heads)", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    rh = att.get("retrieval_head") or {}
    names = list(conds)
    roles = list(next(iter(conds.values())).get("retrieval_head_shares", {}))
    width = 0.8 / max(1, len(names))
    for i, cond in enumerate(names):
        vals = [conds[cond].get("retrieval_head_shares", {}).get(r, 0.0) for r in roles]
        ax.bar([j + i * width for j in range(len(roles))], vals, width, label=cond.replace("_", " "))
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(roles))], roles, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"retrieval head L{rh.get('layer', '?')} H{rh.get('head', '?')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return to_uri(fig)


def user_share_per_layer(atts: dict[str, dict[str, Any]], role: str = "user") -> str:
    """Share of the answer-predicting query's attention on ``role`` per layer, one line per model
    (solid: with the template, dashed: without), all in one panel."""
    require("matplotlib", "report")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.6))
    ax = fig.subplots()
    for i, (name, att) in enumerate(atts.items()):
        color = f"C{i}"
        for cond, dash in (("template", "-"), ("no_template", "--")):
            shares = (att.get("conditions", {}).get(cond) or {}).get("shares", {}).get(role)
            if shares:
                ax.plot(range(len(shares)), shares, dash, color=color, marker="o", markersize=3,
                        label=f"{name}, {cond.replace('_', ' ')}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"share of attention on {role}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return to_uri(fig)


def head_changes(att: dict[str, Any], title: str) -> str:
    """Per (layer, head): the change of the user turn's share under the template (template − none), a diverging
    map (blue: the head attends less to the user turn with the template), and the two distributions over heads."""
    require("matplotlib", "report")
    import numpy as np
    from matplotlib.figure import Figure

    conds = att["conditions"]
    t = np.array(conds["template"]["head_user_shares"], dtype=float)
    n = np.array(conds["no_template"]["head_user_shares"], dtype=float)
    d = t - n
    fig = Figure(figsize=(10.5, 3.8))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    lim = max(1e-6, float(np.abs(d).max()))
    im = ax.imshow(d, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("change of the user share under the template", fontsize=9)
    fig.colorbar(im, ax=ax, label="template − no template")
    bins = np.linspace(0, 1, 26)
    bx.hist(n.ravel(), bins=bins, alpha=0.6, label="no template")
    bx.hist(t.ravel(), bins=bins, alpha=0.6, label="template")
    bx.set_xlabel("user share of one head")
    bx.set_ylabel("heads")
    bx.legend(fontsize=8)
    bx.set_title(f"all {d.size} heads", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return to_uri(fig)
