"""The report's multi-document QA findings: the accuracy-by-position curve and paired tests between modes.

Pairs are the same (question, k, gold position, phrasing) answered in two modes, so every comparison
is an exact McNemar test on ``contains`` (0/1) with the F1 difference as a paired permutation test
(:mod:`ctxaware.stats`). Compared: the template (``raw+prefix`` vs ``chat+prefix``), the response
prefix (``chat`` vs ``chat+prefix``), steering of the whole user turn and of the documents only
(each vs ``chat+prefix``, and documents vs whole turn), the indicator (``chat+prefix+ind``), and, per
mode, the gold document first vs in the middle. Pairs that differ through an answer cut by the
token budget are left out of the decision and named. With several phrasings, the effect per phrasing
and its spread are stated.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from .. import stats
from .verdict import Finding

PAIRS = (  # (kind, first, second, what the first is)
    ("multidoc-template", "raw+prefix", "chat+prefix", "without the template"),
    ("multidoc-prefix", "chat+prefix", "chat", "with the response prefix"),
    ("multidoc-steering", "chat+prefix+steer", "chat+prefix", "steering the whole user turn"),
    ("multidoc-steering-docs", "chat+prefix+steer-docs", "chat+prefix", "steering only the documents"),
    ("multidoc-docs-vs-turn", "chat+prefix+steer-docs", "chat+prefix+steer",
     "emphasising only the documents rather than the whole user turn"),
    ("multidoc-indicator", "chat+prefix+ind", "chat+prefix", "with [IND]"),
)


def _index(records: Sequence[dict[str, Any]]) -> dict[str, dict[tuple, dict[str, Any]]]:
    out: dict[str, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        out[r["mode"]][(r["question_id"], r["k"], r["position"], r["phrasing"])] = r
    return out


def compare(records: Sequence[dict[str, Any]], first: str, second: str) -> tuple[str, dict[str, Any]] | None:
    """The paired test of ``first`` vs ``second`` (effect = accuracy of first − second), or None without pairs."""
    by = _index(records)
    if first not in by or second not in by:
        return None
    keys = sorted(set(by[first]) & set(by[second]))
    if not keys:
        return None
    a = [by[first][k]["contains"] for k in keys]
    b = [by[second][k]["contains"] for k in keys]
    t = stats.mcnemar(a, b)
    f = stats.paired_mean([by[first][k]["f1"] for k in keys], [by[second][k]["f1"] for k in keys])
    n = len(keys)
    nums: dict[str, Any] = {"first": first, "second": second, "n": n, "test": t.to_dict(), "f1_test": f.to_dict(),
                            "accuracy": [sum(a) / n, sum(b) / n], "mde": stats.mde_proportions(n)}
    text = (f"{first} {sum(a) / n:.2f} vs {second} {sum(b) / n:.2f} (contains) over {n} paired prompts: "
            f"{t.describe()}")
    decisive = t
    cut = [k for k, x, y in zip(keys, a, b) if x != y and (by[first][k].get("truncated") or by[second][k].get("truncated"))]
    if cut:
        keep = [i for i, k in enumerate(keys) if k not in set(cut)]
        decisive = stats.mcnemar([a[i] for i in keep], [b[i] for i in keep])
        text += (f"; {len(cut)} of the {t.extra['discordant']} prompts that differ hold an answer cut by the token "
                 f"budget, not evidence either way; without them p = {stats.format_p(decisive.p)}")
        nums["test_without_truncated"] = decisive.to_dict()
    text += (": significant at the 5 % level" if decisive.significant else
             f": no difference detected at n = {decisive.n}")
    text += f"; F1 {f.effect:+.3f} (permutation p = {stats.format_p(f.p)})"
    per_pos = _split(keys, a, b, 2, "position")
    nums["by_position"] = per_pos
    sig = [f"{x['position'] + 1} ({x['effect']:+.2f}, p = {stats.format_p(x['p'])})" for x in per_pos if x["p"] < 0.05]
    text += ("; by gold position: " + ", ".join(f"{x['effect']:+.2f}" for x in per_pos)
             + (f", significant at position {', '.join(sig)}" if sig else ", at no position significant"))
    if len({k[3] for k in keys}) > 1:
        eff = _split(keys, a, b, 3, "phrasing")
        nums["by_phrasing"] = eff
        spread = max(e["effect"] for e in eff) - min(e["effect"] for e in eff)
        text += ("; per phrasing " + ", ".join(f"{e['phrasing']}: {e['effect']:+.2f} (p = {stats.format_p(e['p'])})"
                                               for e in eff) + f", spread {spread:.2f}")
        nums["phrasing_spread"] = spread
    return text + f"; {_mde(n)}.", nums


def _split(keys: list[tuple], a: list[float], b: list[float], axis: int, name: str) -> list[dict[str, Any]]:
    """The exact McNemar test within each value of ``keys[i][axis]`` (gold position, phrasing)."""
    out = []
    for v in sorted({k[axis] for k in keys}):
        ks = [i for i, k in enumerate(keys) if k[axis] == v]
        t = stats.mcnemar([a[i] for i in ks], [b[i] for i in ks])
        out.append({name: v, "effect": t.effect, "p": t.p, "n": t.n})
    return out


def _mde(n: int) -> str:
    mde = stats.mde_proportions(n)
    return (f"with {n} pairs no difference can reach p < 0.05" if mde == float("inf") else
            f"at n = {n} a difference of ≥ {mde:.2f} is detected with 80 % power")


def multidoc_findings(records: Sequence[dict[str, Any]]) -> list[Finding]:
    """The curve per mode, first-vs-middle per mode, and every comparison of :data:`PAIRS` present."""
    if not records:
        return []
    out: list[Finding] = []
    modes = list(dict.fromkeys(r["mode"] for r in records))
    for k in sorted({r["k"] for r in records}):
        recs = [r for r in records if r["k"] == k]
        curves: dict[str, list[float]] = {}
        parts = []
        for mode in modes:
            pos: dict[int, list[float]] = defaultdict(list)
            for r in recs:
                if r["mode"] == mode:
                    pos[r["position"]].append(r["contains"])
            if pos:
                curves[mode] = [sum(pos[p]) / len(pos[p]) for p in sorted(pos)]
                parts.append(f"{mode} " + ", ".join(f"{p + 1}: {sum(pos[p]) / len(pos[p]):.2f}" for p in sorted(pos)))
        out.append(Finding("multidoc-curve", f"Multi-document QA, k = {k} distractors: accuracy (contains) by the gold "
                                             f"document's position (of {k + 1}): " + "; ".join(parts) + ".",
                           {"k": k, "curves": curves}))
        middle = k // 2
        if k >= 2:
            ends = []
            nums = {}
            by = _index(recs)
            for mode in modes:
                keys = sorted({(q, ph) for (q, kk, p, ph) in by[mode] if p == 0}
                              & {(q, ph) for (q, kk, p, ph) in by[mode] if p == middle})
                if not keys:
                    continue
                t = stats.mcnemar([by[mode][(q, k, 0, ph)]["contains"] for q, ph in keys],
                                  [by[mode][(q, k, middle, ph)]["contains"] for q, ph in keys])
                nums[mode] = t.to_dict()
                ends.append(f"{mode} {t.effect:+.2f} (p = {stats.format_p(t.p)})")
            if ends:
                out.append(Finding("multidoc-middle", f"Gold first vs in the middle (position {middle + 1}), k = {k}: "
                                   + "; ".join(ends) + " (exact McNemar over the same questions).", {"k": k, **nums}))
        for kind, first, second, what in PAIRS:
            got = compare(recs, first, second)
            if got:
                text, nums = got
                out.append(Finding(kind, f"Multi-document QA (k = {k}), {what}: {text}", {"k": k, **nums}))
    cut = defaultdict(int)
    for r in records:
        cut[r["mode"]] += bool(r.get("truncated"))
    if any(cut.values()):
        total = defaultdict(int)
        for r in records:
            total[r["mode"]] += 1
        out.append(Finding("multidoc-truncated", "Multi-document QA answers cut by the token budget: "
                           + ", ".join(f"{m} {cut[m]}/{total[m]}" for m in modes) + ".", {"truncated": dict(cut)}))
    return out
