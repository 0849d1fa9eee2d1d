"""The report's verdict: one sentence per finding, with the numbers, computed from the results.

A cell *finds* the needle when its recall is 1 (every keyword in the answer) and *loses* it
otherwise. Comparisons are made on the (length, depth) cells both modes have. Every sentence is a
:class:`Finding` carrying the numbers it states, so tests can check them against counts computed
independently from the result files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..niah.config import parse_mode
from .. import stats

Cell = tuple[int, float]


@dataclass
class Finding:
    """One verdict sentence and the numbers in it."""

    kind: str
    text: str
    numbers: dict[str, Any] = field(default_factory=dict)


def cells_by_mode(records: Sequence[dict[str, Any]]) -> dict[str, dict[Cell, float]]:
    """``{mode: {(length, depth): recall}}``."""
    out: dict[str, dict[Cell, float]] = {}
    for r in records:
        out.setdefault(r["mode"], {})[(int(r["length"]), float(r["depth"]))] = float(r["recall"])
    return out


def lost(cells: dict[Cell, float], on: set[Cell] | None = None) -> set[Cell]:
    """Cells (restricted to ``on``) where the needle was not fully recalled."""
    return {c for c, v in cells.items() if v < 1.0 and (on is None or c in on)}


def where(cells: set[Cell], among: set[Cell] | None = None) -> str:
    """A short description of where cells are: a list when few, else their length/depth range (a cell may carry
    more after its length and depth, e.g. the needle)."""
    if not cells:
        return ""
    if among is not None and cells == among and len(cells) > 1:
        return "every cell"
    ordered = sorted(cells)
    if len(ordered) <= 3:
        return ", ".join(f"{L // 1000 if L % 1000 == 0 else L / 1000:g}k/{d:g} %" for L, d, *_ in ordered)
    lmin, dmax = min(c[0] for c in ordered), max(c[1] for c in ordered)
    return f"all at ≥ {lmin} tokens and depths ≤ {dmax:g} %"


def truncated_by_mode(records: Sequence[dict[str, Any]]) -> dict[str, set[Cell]]:
    """``{mode: cells whose answer stopped at max_new_tokens}`` (records without the flag count as not cut)."""
    out: dict[str, set[Cell]] = {}
    for r in records:
        if r.get("truncated"):
            out.setdefault(r["mode"], set()).add((int(r["length"]), float(r["depth"])))
    return out


def budget(records: Sequence[dict[str, Any]]) -> int | None:
    """The decoding budget the cut answers ran into (their token count), when any answer was cut."""
    cut = [int(r.get("answer_tokens") or 0) for r in records if r.get("truncated")]
    return max(cut) if cut else None


def mde_phrase(n: int) -> str:
    """What a grid of ``n`` paired cells can detect (exact McNemar, 80 % power, all discordant cells one way)."""
    mde = stats.mde_proportions(n)
    if mde == float("inf"):
        return f"with {n} cells no difference can reach p < 0.05"
    return (f"at n = {n} only a difference of ≥ {math.ceil(mde * n - 1e-9)} cells ({mde:.2f}) is detected with "
            f"80 % power")


def paired_test(first: dict[Cell, float], second: dict[Cell, float], common: set[Cell],
                cut: set[Cell] = frozenset(), budget_tokens: int | None = None) -> tuple[str, dict[str, Any]]:
    """The exact McNemar test of found/lost over ``common`` cells (effect = found in ``first`` − found in
    ``second``), with the mean-recall permutation test; when cells that differ hold answers cut by the token
    budget (``cut``), they are named, the test is repeated without them, and a budget that would do is given."""
    order = sorted(common)
    a = [1 if first[c] >= 1.0 else 0 for c in order]
    b = [1 if second[c] >= 1.0 else 0 for c in order]
    t = stats.mcnemar(a, b)
    r = stats.paired_mean([first[c] for c in order], [second[c] for c in order])
    n = len(order)
    diff = t.extra["first_only"] - t.extra["second_only"]
    text = (f" Exact McNemar over the {n} paired cells: {diff:+d} cells ({t.effect:+.2f}, 95 % CI "
            f"{t.ci[0]:+.2f} to {t.ci[1]:+.2f}, p = {stats.format_p(t.p)})")
    nums: dict[str, Any] = {"test": t.to_dict(), "recall_test": r.to_dict(), "mde": stats.mde_proportions(n)}
    decisive, m = t, n
    differ = {c for c, x, y in zip(order, a, b) if x != y}
    cut_differ = differ & set(cut)
    if cut_differ:
        keep = [c for c in order if c not in cut_differ]
        decisive = stats.mcnemar([1 if first[c] >= 1.0 else 0 for c in keep],
                                 [1 if second[c] >= 1.0 else 0 for c in keep])
        m = len(keep)
        more = f", e.g. --max-new-tokens {2 * budget_tokens}," if budget_tokens else ""
        text += (f"; {len(cut_differ)} of the {len(differ)} cells that differ hold an answer cut by the "
                 f"{budget_tokens or 'decoding'}-token budget ({where(cut_differ)}), not evidence either way "
                 f"(a larger budget{more} would tell); without them "
                 f"{decisive.extra['first_only'] - decisive.extra['second_only']:+d} cells, p = "
                 f"{stats.format_p(decisive.p)}")
        nums.update(truncated_differ=len(cut_differ), test_without_truncated=decisive.to_dict())
    nums["decisive"] = decisive.to_dict()
    verdict = "significant at the 5 % level" if decisive.significant else f"no difference detected at n = {m}"
    text += (f": {verdict}; mean recall {r.effect:+.3f} (permutation p = {stats.format_p(r.p)}); "
             f"{mde_phrase(n)}.")
    return text, nums


def _counterpart(mode: str, drop: str) -> str | None:
    base, flags = parse_mode(mode)
    if drop == "template":
        return None if base != "chat" else "+".join(["raw"] + [f for f in ("prefix", "ind", "steer") if f in flags])
    return "+".join([base] + [f for f in ("prefix", "ind", "steer") if f in flags and f != drop])


def _lost_phrase(n: int, total: int, cells: set[Cell], among: set[Cell] | None = None) -> str:
    w = where(cells, among)
    return f"{n} of {total} cells" + (f" ({w})" if w else "")


def niah_findings(records: Sequence[dict[str, Any]]) -> list[Finding]:
    """Template, steering, response-prefix and length findings of one model's NIH records."""
    by = cells_by_mode(records)
    cut, tokens = truncated_by_mode(records), budget(records)
    out: list[Finding] = []
    for mode in by:
        base, flags = parse_mode(mode)
        if base != "chat" or "steer" in flags:
            continue
        raw = _counterpart(mode, "template")
        if raw in by:
            common = set(by[mode]) & set(by[raw])
            a, b = lost(by[mode], common), lost(by[raw], common)
            diff = len(a) - len(b)
            test, nums = paired_test(by[raw], by[mode], common, cut.get(mode, set()) | cut.get(raw, set()), tokens)
            cells = f"{abs(diff)} cell{'s' if abs(diff) != 1 else ''}"
            effect = ("the template costs nothing on this grid" if diff == 0 else
                      f"{cells} {'more' if diff > 0 else 'fewer'} lost with the template, made of answers cut by "
                      "the token budget" if nums.get("truncated_differ") and not nums["decisive"]["significant"] else
                      f"{cells} {'more' if diff > 0 else 'fewer'} lost with the template, within chance"
                      if not nums["decisive"]["significant"] else
                      f"the template costs {cells}" if diff > 0 else f"the template helps by {cells}")
            out.append(Finding("template", f"With its chat template ({mode}) the model loses the needle in "
                               f"{_lost_phrase(len(a), len(common), a, common)}; without the template ({raw}) in "
                               f"{_lost_phrase(len(b), len(common), b, common)}: {effect}." + test,
                               {"mode": mode, "other": raw, "cells": len(common), "lost": len(a),
                                "lost_other": len(b), "lost_cells": sorted(a), "lost_other_cells": sorted(b),
                                **nums}))
    for mode in by:
        if "steer" not in parse_mode(mode)[1]:
            continue
        plain = _counterpart(mode, "steer")
        if plain not in by:
            continue
        common = set(by[mode]) & set(by[plain])
        a, b = lost(by[plain], common), lost(by[mode], common)
        rec, new = a - b, b - a
        alpha = next((r.get("alpha") for r in records if r["mode"] == mode and "alpha" in r), None)
        heads = next((r.get("heads") for r in records if r["mode"] == mode and "heads" in r), None)
        how = f" (α = {alpha:g}, heads {heads})" if alpha is not None else ""
        test, nums = paired_test(by[mode], by[plain], common, cut.get(mode, set()) | cut.get(plain, set()), tokens)
        out.append(Finding("steering", f"Steering{how} recovers {len(rec)} of the {len(a)} cells {plain} loses"
                           + (f" ({where(rec)})" if rec and len(rec) <= 3 else "")
                           + (f" and loses {len(new)} it found ({where(new)})" if new else "")
                           + f": {mode} loses {len(b)} of {len(common)}." + test,
                           {"mode": mode, "other": plain, "cells": len(common), "recovered": len(rec),
                            "lost_other": len(a), "newly_lost": len(new), "lost": len(b), **nums}))
    for mode in by:
        base, flags = parse_mode(mode)
        if "prefix" in flags or "steer" in flags:
            continue
        with_prefix = "+".join([base, "prefix"] + [f for f in ("ind",) if f in flags])
        if with_prefix not in by:
            continue
        common = set(by[mode]) & set(by[with_prefix])
        a, b = lost(by[mode], common), lost(by[with_prefix], common)
        mean = sum(by[mode][c] for c in common) / max(1, len(common))
        test, nums = paired_test(by[with_prefix], by[mode], common,
                                 cut.get(mode, set()) | cut.get(with_prefix, set()), tokens)
        out.append(Finding("prefix", f"Without the response prefix ({mode}) the model loses the needle in "
                           f"{_lost_phrase(len(a), len(common), a, common)} (mean recall {mean:.2f}), "
                           f"with it ({with_prefix}) in {len(b)}." + test,
                           {"mode": mode, "other": with_prefix, "cells": len(common), "lost": len(a),
                            "lost_other": len(b), "mean_recall": mean, **nums}))
    if len(by) > 1:
        common = set.intersection(*(set(v) for v in by.values()))
        everywhere = set.intersection(*(lost(v, common) for v in by.values())) if common else set()
        if everywhere:
            out.append(Finding("length", f"Every mode loses the needle in {_lost_phrase(len(everywhere), len(common), everywhere, common)}: "
                               "a limit of the model at that length, not an effect of the template.",
                               {"cells": len(common), "lost": len(everywhere), "lost_cells": sorted(everywhere)}))
    if cut:
        per = ", ".join(f"{m} {len(cut.get(m, ()))}/{len(by[m])}" for m in by)
        out.append(Finding("truncated", f"Answers cut by the {tokens}-token budget (they stopped at max_new_tokens, "
                           f"not at an end token): {per}. A cell lost with a cut answer says nothing about the "
                           f"template or steering; rerun with a larger --max-new-tokens (e.g. {2 * (tokens or 0)}).",
                           {"truncated": {m: len(cut.get(m, ())) for m in by}, "budget": tokens}))
    if not out:
        for mode, cells in by.items():
            a = lost(cells)
            out.append(Finding("mode", f"In {mode} the model loses the needle in {_lost_phrase(len(a), len(cells), a)}.",
                               {"mode": mode, "cells": len(cells), "lost": len(a)}))
    return out


def attention_findings(att: dict[str, Any]) -> list[Finding]:
    """User share of the answer-predicting query's attention, with vs without the template."""
    conds = att.get("conditions", {})
    if "template" not in conds:
        return []
    t = conds["template"]
    mean = t.get("mean_shares") or {k: sum(v) / len(v) for k, v in t["shares"].items() if v}
    parts = [f"Under the template the answer-predicting query gives the user turn {100 * mean.get('user', 0):.1f} % "
             f"of its attention (mean over layers; template tokens {100 * mean.get('template', 0):.1f} %"
             + (f", first token {100 * mean['bos']:.1f} %" if "bos" in mean else "") + ")"]
    nums = {"user_template": mean.get("user", 0.0)}
    if "no_template" in conds:
        n = conds["no_template"].get("mean_shares") or {k: sum(v) / len(v)
                                                         for k, v in conds["no_template"]["shares"].items() if v}
        parts.append(f"without it {100 * n.get('user', 0):.1f} %")
        nums["user_no_template"] = n.get("user", 0.0)
    rh = att.get("retrieval_head")
    if rh and "retrieval_head_shares" in t:
        s = f"on the retrieval head (layer {rh['layer']}, head {rh['head']}) {100 * t['retrieval_head_shares']['user']:.1f} %"
        nums["user_head_template"] = t["retrieval_head_shares"]["user"]
        if "no_template" in conds and "retrieval_head_shares" in conds["no_template"]:
            v = conds["no_template"]["retrieval_head_shares"]["user"]
            s += f" vs {100 * v:.1f} % without"
            nums["user_head_no_template"] = v
        parts.append(s)
    return [Finding("attention", "; ".join(parts) + ".", nums)]


def head_findings(att: dict[str, Any]) -> list[Finding]:
    """The user turn's share over every layer and head, with vs without the template: the distribution (quartiles),
    the share of heads whose user share falls, and the sign and Wilcoxon signed-rank tests across heads."""
    import numpy as np

    conds = att.get("conditions", {})
    if not all("head_user_shares" in conds.get(c, {}) for c in ("template", "no_template")):
        return []
    t = np.array(conds["template"]["head_user_shares"], dtype=float).ravel()
    n = np.array(conds["no_template"]["head_user_shares"], dtype=float).ravel()
    d = t - n
    sign, wil = stats.sign_test(d), stats.wilcoxon(d)
    q = lambda x: " / ".join(f"{100 * v:.1f}" for v in np.quantile(x, [0.25, 0.5, 0.75]))  # noqa: E731
    falls = int(np.sum(d < 0))
    verdict = ("significant at the 5 % level" if wil.significant else f"no difference detected at n = {wil.n} heads")
    text = (f"Over all {d.size} heads (every layer): the user turn's share, quartiles {q(t)} % with the template vs "
            f"{q(n)} % without; it falls under the template in {falls} of {d.size} heads ({100 * falls / d.size:.0f} %, "
            f"sign test p = {stats.format_p(sign.p)}), median change {100 * float(np.median(d)):+.2f} points "
            f"(Wilcoxon signed-rank p = {stats.format_p(wil.p)}): {verdict}.")
    return [Finding("attention-heads", text, {"heads": int(d.size), "falls": falls, "sign_test": sign.to_dict(),
                                              "wilcoxon": wil.to_dict(), "median_change": float(np.median(d))})]


def calibration_findings(cal: dict[str, Any]) -> list[Finding]:
    """The chosen steering vs the unsteered model on the held-in cells: exact McNemar on found/lost (paired by
    cell), when the search recorded both candidates' per-cell outcomes."""
    rows = cal.get("rows") or (cal.get("meta") or {}).get("search") or []
    chosen = (cal.get("meta") or {}).get("chosen")
    base = rows[0] if rows else None
    pick = next((r for r in rows if r.get("candidate") == chosen), None)
    if not base or not pick or pick is base or not base.get("heldin_found") or not pick.get("heldin_found") \
            or len(base["heldin_found"]) != len(pick["heldin_found"]):
        return []
    t = stats.mcnemar(pick["heldin_found"], base["heldin_found"])
    n = t.n
    verdict = "significant at the 5 % level" if t.significant else f"no difference detected at n = {n}"
    return [Finding("calibration", f"Calibration: the chosen steering ({chosen}) finds the needle in "
                    f"{sum(pick['heldin_found'])} of {n} held-in cells, unsteered ({base['candidate']}) in "
                    f"{sum(base['heldin_found'])}: {t.describe('of the cells')}: {verdict}; {mde_phrase(n)}. "
                    "The held-in cells chose the candidate, so this difference is optimistic; the study's held-out "
                    "grid is the test.", {"chosen": chosen, "baseline": base["candidate"], "test": t.to_dict()})]


def qa_findings(qa: dict[str, dict[str, Any]]) -> list[Finding]:
    """One sentence per QA dataset: the metric per variant with its standard error."""
    by_set: dict[str, list[str]] = {}
    for variant, tables in qa.items():
        for task, row in tables.items():
            name = task.replace("ctxaware_", "").split("_")[0]
            se = f" ± {row['stderr']:.2f}" if row.get("stderr") is not None else ""
            by_set.setdefault(name, []).append(f"{variant} {row['metric']} {row['value']:.2f}{se}")
    return [Finding("qa", f"{name.upper()}: " + ", ".join(items) + ".", {"dataset": name})
            for name, items in by_set.items()]


def base_task(name: str) -> tuple[str, int]:
    """``"SF@q2"`` -> ``("SF", 2)``; a name without a phrasing suffix is phrasing 0."""
    import re

    m = re.fullmatch(r"(.+)@q(\d+)", str(name))
    return (m.group(1), int(m.group(2))) if m else (str(name), 0)


def phrasing_findings(records: Sequence[dict[str, Any]]) -> list[Finding]:
    """For a needle/task run in several phrasings: each comparison (template, steering) pooled over the phrasings
    (exact McNemar over every paired (phrasing, cell)), the effect per phrasing and its spread."""
    groups: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in records:
        base, i = base_task(r.get("needle", "?"))
        groups.setdefault(base, {}).setdefault(i, []).append(r)
    out = []
    for base, by_phr in groups.items():
        if len(by_phr) < 2:
            continue
        modes = {r["mode"] for rs in by_phr.values() for r in rs}
        pairs = [(m, _counterpart(m, "template"), "the template") for m in sorted(modes)
                 if parse_mode(m)[0] == "chat" and "steer" not in parse_mode(m)[1]]
        pairs += [(m, _counterpart(m, "steer"), "steering") for m in sorted(modes) if "steer" in parse_mode(m)[1]]
        for mode, other, what in pairs:
            if other not in modes:
                continue
            a, b, per = [], [], []
            for i in sorted(by_phr):
                cells = cells_by_mode(by_phr[i])
                if mode not in cells or other not in cells:
                    continue
                common = sorted(set(cells[mode]) & set(cells[other]))
                x = [1 if cells[mode][c] >= 1.0 else 0 for c in common]
                y = [1 if cells[other][c] >= 1.0 else 0 for c in common]
                t = stats.mcnemar(x, y)
                per.append({"phrasing": i, "effect": t.effect, "p": t.p, "n": t.n})
                a += x
                b += y
            if len(per) < 2:
                continue
            t = stats.mcnemar(a, b)
            spread = max(p["effect"] for p in per) - min(p["effect"] for p in per)
            verdict = "significant at the 5 % level" if t.significant else f"no difference detected at n = {t.n}"
            out.append(Finding("phrasings", f"{base} over {len(per)} phrasings, {what} ({other} → {mode}): the share of "
                               f"cells found changes by {t.effect:+.2f} pooled (exact McNemar over {t.n} paired cells, "
                               f"95 % CI {t.ci[0]:+.2f} to {t.ci[1]:+.2f}, p = {stats.format_p(t.p)}): {verdict}; per "
                               "phrasing " + ", ".join(f"{p['phrasing']}: {p['effect']:+.2f} (p = {stats.format_p(p['p'])})"
                                                       for p in per) + f"; spread {spread:.2f}.",
                               {"task": base, "mode": mode, "other": other, "test": t.to_dict(), "by_phrasing": per,
                                "spread": spread}))
    return out
