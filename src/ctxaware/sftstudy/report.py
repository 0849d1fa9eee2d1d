"""The sft-study page: the paper's Table 3 (arm × NIH / SQuAD / QuAC / DROP / MT-Bench), verdicts, heatmaps.

Every number comes from the arms' result files, read through :func:`ctxaware.report.load_results`
(NIH records, QA tables) and ``mtbench/judgments.jsonl`` (when MT-Bench ran): an NIH cell
is its recall, an arm's NIH score is the mean over its cells with the standard error of that mean;
QA values and standard errors are lm-eval's. Table cells carry ``data-row``/``data-col``/
``data-value`` attributes so that the page can be checked against the files. One verdict sentence
per comparison (conditional with ``[IND]`` vs vanilla, and the conditional arm with vs without
``[IND]``) and column. NIH and MT-Bench are PAIRED tests over the same items: NIH cells paired by
(length, depth, needle) within the compared modes, tested with the exact McNemar test of found
(recall 1) vs lost when every recall is 0 or 1, else a paired permutation test of recall (bootstrap
interval), reusing :func:`ctxaware.report.verdict.paired_test` and its rule that cells whose answers
were cut by the token budget are not evidence; MT-Bench judgments paired by (question, turn), paired
permutation test of the score. Each states the effect, its 95 % interval, p, n, the minimum
detectable effect at that n, and "no difference detected at n = …" when not significant. QA keeps
lm-eval's aggregates only (no per-question outcomes are stored), so its sentence is the unpaired
two-standard-error comparison and says so. When the arms trained with
the monitor, their context-awareness curves (template gap, user share, recall per probe mode against
the step, one line per arm) are drawn from ``<arm>/model/context_awareness.jsonl``.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from ..fsio import atomic_write_text
from ..niah.config import canonical_mode
from ..report import charts
from ..report.html import CSS, _img, _table
from .. import stats
from ..report.verdict import Finding, budget, cells_by_mode, paired_test, where

#: Table 3 rows: (row name, arm, NIH/QA with [IND])
#: short panel names of the heatmaps (the mode is in the figure's title)
PANELS = {"vanilla": "vanilla", "conditional + [IND]": "conditional +[IND]",
          "conditional, no [IND] (ablation)": "conditional, no [IND]"}
ROWS = (("vanilla", "vanilla", False), ("conditional + [IND]", "conditional", True),
        ("conditional, no [IND] (ablation)", "conditional", False))
QA_NAMES = {"squad": "SQuAD", "quac": "QuAC", "drop": "DROP"}


def mean_se(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean, standard error of the mean (sample standard deviation / √n) and n."""
    n = len(values)
    if not n:
        return None, None, 0
    mean = sum(values) / n
    if n < 2:
        return mean, None, n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _judgments(arm_dir: Path, arm: str, run: dict[str, Any] | None = None) -> list[dict[str, Any]] | None:
    """The arm's scored MT-Bench judgments (``judgments.jsonl``) of ONE (condition, judge model, judge endpoint):
    the study's last run (``run``: its summary); None when several are in the file and no run says which."""
    from ..fsio import read_jsonl

    path = arm_dir / "mtbench" / "judgments.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    rows = [j for j in rows if j.get("model") == arm]
    if run:
        rows = [j for j in rows if (j.get("condition"), j.get("judge"), j.get("judge_url")) ==
                (run.get("condition"), run.get("judge"), run.get("judge_url"))]
    elif len({(j.get("condition"), j.get("judge"), j.get("judge_url")) for j in rows}) > 1:
        return None  # several judges or conditions and no run says which: no blend
    return [j for j in rows if j.get("score") is not None]


def _mtbench(arm_dir: Path, arm: str, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """MT-Bench score of an arm: mean ± standard error over its judged turns of one run (:func:`_judgments`)."""
    rows = _judgments(arm_dir, arm, run)
    if rows is None:
        return {"value": None, "se": None, "n": 0}
    v, se, n = mean_se([float(j["score"]) for j in rows])
    return {"value": v, "se": se, "n": n}


def table(out: str | Path) -> dict[str, Any]:
    """The numbers of Table 3: ``{"columns": [...], "rows": {row: {column: {"value", "se", "n"}}}}``."""
    from ..report.load import load_results

    out = Path(out)
    state = json.loads((out / "sft_study.json").read_text(encoding="utf-8"))
    modes = state["config"]["modes"]
    results = {m.model: m for m in load_results([out / arm for arm in ("vanilla", "conditional")])}
    columns, rows = [], {name: {} for name, _, _ in ROWS}
    for mode in modes:
        col = f"NIH {mode}"
        columns.append(col)
        for name, arm, ind in ROWS:
            m = results.get(arm)
            cells = cells_by_mode(m.niah).get(canonical_mode(mode + "+ind") if ind else mode, {}) if m else {}
            v, se, n = mean_se(list(cells.values()))
            rows[name][col] = {"value": v, "se": se, "n": n}
    for ds in state["config"].get("qa") or []:
        col = QA_NAMES.get(ds, ds)
        columns.append(col)
        for name, arm, ind in ROWS:
            m = results.get(arm)
            tables = (m.qa.get("chat+ind" if ind else "chat") or {}) if m else {}
            row = next((r for task, r in tables.items() if task.replace("ctxaware_", "").split("_")[0] == ds), None)
            rows[name][col] = ({"value": row["value"], "se": _finite(row.get("stderr")), "n": row.get("n")} if row
                               else {"value": None, "se": None, "n": 0})
    if state["config"].get("mtbench_judge_url"):
        columns.append("MT-Bench")
        for name, arm, ind in ROWS:  # asked without [IND]: one run per arm, shown on its main row
            ablation = arm == "conditional" and not ind
            run = ((state.get("stages") or {}).get("eval") or {}).get(arm, {}).get("mtbench")
            rows[name]["MT-Bench"] = {"value": None, "se": None, "n": 0} if ablation else _mtbench(out / arm, arm, run)
    return {"columns": columns, "rows": rows, "state": state, "results": results, "out": out}


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "none"


def _fmt(cell: dict[str, Any]) -> str:
    if cell.get("value") is None:
        return "–"
    se = f" ± {cell['se']:.3f}" if cell.get("se") is not None else ""
    return f"{cell['value']:.3f}{se}"


UNPAIRED_QA = "unpaired: per-question outcomes not stored"


def compare(col: str, a_name: str, a: dict[str, Any], b_name: str, b: dict[str, Any],
            note: str = UNPAIRED_QA) -> Finding | None:
    """The UNPAIRED verdict sentence: ``a`` against ``b`` on column ``col`` from the aggregates (mean ± standard
    error), used where no per-item outcomes exist; ``note`` says why it is not paired."""
    if a.get("value") is None or b.get("value") is None:
        return None
    d = a["value"] - b["value"]
    if a.get("se") is None or b.get("se") is None:
        se, verdict = math.nan, "too few samples for a standard error, so no verdict"
    else:
        se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
        if d == 0:
            verdict = "no difference"
        elif abs(d) > 2 * se:
            verdict = f"{a_name} is {'better' if d > 0 else 'worse'} (beyond two standard errors, {2 * se:.3f})"
        else:
            verdict = f"no clear difference (within two standard errors, {2 * se:.3f})"
    text = (f"{col}: {a_name} {_fmt(a)} vs {b_name} {_fmt(b)} (n = {a.get('n')} / {b.get('n')}), "
            f"difference {d:+.3f}: {verdict} ({note}).")
    return Finding("sft", text, {"column": col, "a": a_name, "b": b_name, "difference": d, "se": se,
                                 "paired": False, "note": note})


def _head(col: str, a_name: str, a: dict[str, Any], b_name: str, b: dict[str, Any]) -> str:
    d = a["value"] - b["value"]
    return (f"{col}: {a_name} {_fmt(a)} vs {b_name} {_fmt(b)} (n = {a.get('n')} / {b.get('n')}), "
            f"difference {d:+.3f}.")


def _direction(a_name: str, decisive: stats.Test) -> str:
    return (f" {a_name} is {'better' if decisive.effect > 0 else 'worse'} on this column." if decisive.significant
            and decisive.effect != 0 else "")


def _mean_mde_phrase(n: int, sd: float, unit: str) -> str:
    """What ``n`` paired items can detect in a mean difference (paired test, 80 % power) with differences of
    deviation ``sd``."""
    if n < 2 or not sd > 0:
        return f"with {n} paired {unit} and no spread in their differences the detectable effect is not estimable"
    return f"at n = {n} only a mean difference of ≥ {stats.mde_means(n, sd):.3f} is detected with 80 % power"


def niah_cells(records: list[dict[str, Any]]) -> dict[tuple[int, float, str], float]:
    """``{(length, depth, needle): recall}`` of one mode's NIH records (the last record of a cell wins)."""
    return {(int(r["length"]), float(r["depth"]), str(r.get("needle", ""))): float(r["recall"]) for r in records}


def compare_niah(col: str, a_name: str, a: dict[str, Any], a_records: list[dict[str, Any]], b_name: str,
                 b: dict[str, Any], b_records: list[dict[str, Any]]) -> Finding | None:
    """The PAIRED NIH verdict: ``a``'s cells against ``b``'s, paired by (length, depth, needle). Exact McNemar on
    found/lost when every recall is 0 or 1 (:func:`~ctxaware.report.verdict.paired_test`), else a paired
    permutation test of recall; a difference made of answers cut by the token budget is not attributed."""
    if a.get("value") is None or b.get("value") is None:
        return None
    fa, fb = niah_cells(a_records), niah_cells(b_records)
    common = set(fa) & set(fb)
    if not common:
        return compare(col, a_name, a, b_name, b, "unpaired: the arms share no NIH cell")
    cut = {k for k in niah_cells([r for r in a_records + b_records if r.get("truncated")])}
    tokens = budget(a_records + b_records)
    order = sorted(common)
    n = len(order)
    if all(fa[c] in (0.0, 1.0) and fb[c] in (0.0, 1.0) for c in order):
        text, nums = paired_test(fa, fb, common, cut, tokens)
        decisive = stats.Test(**{k: v for k, v in nums["decisive"].items() if k != "significant"})
    else:
        t = stats.paired_mean([fa[c] for c in order], [fb[c] for c in order])
        text = (f" Paired permutation test of recall over the {n} paired cells: {t.effect:+.3f} (95 % bootstrap CI "
                f"{t.ci[0]:+.3f} to {t.ci[1]:+.3f}, p = {stats.format_p(t.p)})")
        nums = {"test": t.to_dict(), "mde": stats.mde_means(n, t.extra["sd_diff"])}
        decisive, m = t, n
        differ = {c for c in order if fa[c] != fb[c]}
        cut_differ = differ & cut
        if cut_differ:
            keep = [c for c in order if c not in cut_differ]
            decisive = stats.paired_mean([fa[c] for c in keep], [fb[c] for c in keep])
            m = len(keep)
            text += (f"; {len(cut_differ)} of the {len(differ)} cells that differ hold an answer cut by the "
                     f"{tokens or 'decoding'}-token budget ({where(cut_differ)}), not evidence either way; without "
                     f"them {decisive.effect:+.3f}, p = {stats.format_p(decisive.p)}")
            nums.update(truncated_differ=len(cut_differ), test_without_truncated=decisive.to_dict())
        nums["decisive"] = decisive.to_dict()
        verdict = "significant at the 5 % level" if decisive.significant else f"no difference detected at n = {m}"
        text += f": {verdict}; {_mean_mde_phrase(n, t.extra['sd_diff'], 'cells')}."
    return Finding("sft", _head(col, a_name, a, b_name, b) + text + _direction(a_name, decisive),
                   {"column": col, "a": a_name, "b": b_name, "difference": a["value"] - b["value"], "paired": True,
                    "cells": n, **nums})


def compare_mtbench(col: str, a_name: str, a: dict[str, Any], a_rows: list[dict[str, Any]] | None, b_name: str,
                    b: dict[str, Any], b_rows: list[dict[str, Any]] | None) -> Finding | None:
    """The PAIRED MT-Bench verdict: judgments paired by (question, turn), paired permutation test of the score."""
    if a.get("value") is None or b.get("value") is None:
        return None
    key = lambda j: (str(j["question_id"]), int(j["turn"]))  # noqa: E731
    sa = {key(j): float(j["score"]) for j in a_rows or []}
    sb = {key(j): float(j["score"]) for j in b_rows or []}
    order = sorted(set(sa) & set(sb))
    if not order:
        return compare(col, a_name, a, b_name, b, "unpaired: no (question, turn) judged in both arms")
    n = len(order)
    t = stats.paired_mean([sa[k] for k in order], [sb[k] for k in order])
    verdict = "significant at the 5 % level" if t.significant else f"no difference detected at n = {n}"
    text = (f" Paired permutation test of the score over the {n} (question, turn) pairs judged in both arms: "
            f"{t.effect:+.3f} (95 % bootstrap CI {t.ci[0]:+.3f} to {t.ci[1]:+.3f}, p = {stats.format_p(t.p)}): "
            f"{verdict}; {_mean_mde_phrase(n, t.extra['sd_diff'], 'turns')}.")
    return Finding("sft", _head(col, a_name, a, b_name, b) + text + _direction(a_name, t),
                   {"column": col, "a": a_name, "b": b_name, "difference": a["value"] - b["value"], "paired": True,
                    "pairs": n, "test": t.to_dict(), "decisive": t.to_dict(),
                    "mde": stats.mde_means(n, t.extra["sd_diff"])})


def verdicts(tab: dict[str, Any]) -> list[Finding]:
    """Conditional + [IND] vs vanilla, then conditional with vs without [IND], per column: paired for NIH and
    MT-Bench (per-item outcomes), unpaired and said so for QA (aggregates only)."""
    rows, results = tab["rows"], tab["results"]
    arm_of = {name: (arm, ind) for name, arm, ind in ROWS}
    run = lambda arm: (((tab["state"].get("stages") or {}).get("eval") or {}).get(arm) or {}).get("mtbench")  # noqa: E731

    def niah_records(name: str, mode: str) -> list[dict[str, Any]]:
        arm, ind = arm_of[name]
        want = canonical_mode(mode + "+ind") if ind else mode
        return [r for r in (results[arm].niah if arm in results else []) if r["mode"] == want]

    out = []
    for (a, b) in ((ROWS[1][0], ROWS[0][0]), (ROWS[1][0], ROWS[2][0])):
        for col in tab["columns"]:
            if col.startswith("NIH "):
                f = compare_niah(col, a, rows[a][col], niah_records(a, col[4:]), b, rows[b][col],
                                 niah_records(b, col[4:]))
            elif col == "MT-Bench" and "out" in tab:
                (arm_a, _), (arm_b, _) = arm_of[a], arm_of[b]
                f = compare_mtbench(col, a, rows[a][col], _judgments(tab["out"] / arm_a, arm_a, run(arm_a)), b,
                                    rows[b][col], _judgments(tab["out"] / arm_b, arm_b, run(arm_b)))
            else:
                f = compare(col, a, rows[a][col], b, rows[b][col])
            if f:
                out.append(f)
    return out


def _table3(tab: dict[str, Any]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in ["arm"] + tab["columns"])
    body = []
    for name, _, _ in ROWS:
        cells = []
        for col in tab["columns"]:
            c = tab["rows"][name][col]
            attrs = (f' data-row="{escape(name)}" data-col="{escape(col)}" data-value="{c["value"]!r}" '
                     f'data-se="{c["se"]!r}" data-n="{c["n"]!r}"') if c.get("value") is not None else ""
            cells.append(f'<td class="num"{attrs}>{escape(_fmt(c))}</td>')
        body.append(f"<tr><td>{escape(name)}</td>{''.join(cells)}</tr>")
    return f'<table class="table3"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _heatmaps(tab: dict[str, Any]) -> list[str]:
    results, modes = tab["results"], tab["state"]["config"]["modes"]
    parts = []
    for mode in modes:
        records, panels = [], []
        for name, arm, ind in ROWS:
            m = results.get(arm)
            want = canonical_mode(mode + "+ind") if ind else mode
            rows = [dict(r, mode=PANELS[name]) for r in (m.niah if m else []) if r["mode"] == want]
            if rows:
                records += rows
                panels.append(PANELS[name])
        if panels:
            parts.append(_img(charts.heatmaps(records, panels, f"NIH recall, {mode}"), f"NIH heatmaps, {mode}"))
    return parts


def _attention(tab: dict[str, Any]) -> list[str]:
    parts, rows, atts = [], [], {}
    for arm in ("vanilla", "conditional"):
        m = tab["results"].get(arm)
        if not (m and m.attention):
            continue
        atts[arm] = m.attention
        conds = m.attention["conditions"]
        rows.append([arm] + [f"{100 * conds[c]['mean_shares'].get('user', 0):.1f} %" for c in ("template", "no_template")
                             if c in conds])
        parts.append(_img(charts.attention_roles(m.attention, arm), f"attention by role of {arm}"))
    if rows:
        parts[:0] = [_table(["arm", "user share, template", "user share, no template"], rows),
                     _img(charts.user_share_per_layer(atts), "attention on the user turn per layer, both arms")]
    return parts


def _settings(state: dict[str, Any]) -> str:
    s = state.get("settings") or {}
    equal = {k: v for k, v in (s.get("equal") or {}).items() if k not in ("progress",)}
    rows = [(k, json.dumps(v, default=str)) for k, v in equal.items()]
    diff = [(k, json.dumps(v.get("vanilla"), default=str), json.dumps(v.get("conditional"), default=str))
            for k, v in (s.get("differ") or {}).items()]
    data = [(k, v.get("vanilla"), v.get("conditional")) for k, v in (s.get("data") or {}).items()]
    return ("<p>Equal in both arms:</p>" + _table(["setting", "value"], rows)
            + "<p>Different by design:</p>" + _table(["setting", "vanilla", "conditional"], diff)
            + ("<p>What each arm trained on:</p>" + _table(["count", "vanilla", "conditional"], data) if data else ""))


def _monitor(out: str | Path) -> str:
    """Both arms' context-awareness curves during training (their ``model/context_awareness.jsonl``)."""
    from ..report.monitor import monitor_path, read_monitor, section

    series = {arm: read_monitor(p) for arm in ("vanilla", "conditional") if (p := monitor_path(Path(out) / arm))}
    return section(series)


def render(out: str | Path) -> str:
    """The HTML page of the sft-study in ``out``."""
    tab = table(out)
    state = tab["state"]
    lab = state["stages"].get("label", {})
    train = state["stages"].get("train", {})
    body = [f"<h1>Vanilla vs conditional fine-tuning: {escape(str(state['config']['model']))}</h1>",
            f"<p class=\"muted\">Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by ctxaware "
            f"sft-study from {escape(str(state['config']['dataset']))}. Values are means ± standard errors.</p>",
            "<h2>Labelling</h2>",
            f"<p>Probe {escape(str(state['stages'].get('score', {}).get('probe')))}: "
            f"{lab.get('labelled_turns')} of {lab.get('scored_turns')} scored turns labelled with [IND] "
            f"(fraction {lab.get('fraction_labelled', 0):.3f}, rule {escape(str(lab.get('rule')))}, lowest labelled "
            f"score {_num(lab.get('threshold'))}, best score {_num(lab.get('best_score'))}).</p>",
            "<h2>Table 3</h2>", _table3(tab),
            "<p class=\"muted\">NIH: mean recall over the grid's cells. QA: contains-match accuracy (lm-eval). "
            "The conditional arm's NIH and QA questions carry [IND] in the second row and not in the third; "
            "MT-Bench questions are asked without it.</p>",
            "<h2>Verdict</h2><ul class=\"verdict\">"
            + "".join(f"<li data-kind=\"{f.kind}\">{escape(f.text)}</li>" for f in verdicts(tab)) + "</ul>",
            "<h2>Heatmaps</h2>", *_heatmaps(tab), "<h2>Attention on the user turn</h2>", *_attention(tab),
            "<h2>Training</h2>",
            _table(["arm", "steps", "train loss", "seconds", "[IND] token"],
                   [[arm, train.get(arm, {}).get("steps"), f"{train.get(arm, {}).get('train_loss') or float('nan'):.4f}",
                     train.get(arm, {}).get("seconds"), train.get(arm, {}).get("indicator_id")] for arm in train]),
            _monitor(out),
            "<h2>Settings that make the arms equal</h2>", _settings(state),
            "<h2>Provenance</h2>", _table(["package", "version"], sorted((state.get("versions") or {}).items())),
            "<p>Seconds per stage: " + escape(", ".join(f"{k} {v:g}" for k, v in state.get("seconds", {}).items()))
            + "</p><pre>" + escape(json.dumps(state["config"], indent=1, default=str)) + "</pre>"]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ctxaware sft-study</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_report(out: str | Path) -> Path:
    """Write ``out/report.html`` atomically and return its path."""
    return atomic_write_text(Path(out) / "report.html", render(out))
