"""The report page: one self-contained HTML file (inline CSS and PNGs, no script, no external link).

Sections: verdict (one sentence per finding, per model), a table of NIH cells found per mode and
model, heatmaps per mode side by side, recall vs length, attention by role, QA with standard
errors, MT-Bench per model and condition, calibration, context awareness during training (the curves
of ``context_awareness.jsonl``), and provenance (model, versions, configuration, reproducing commands).
"""

from __future__ import annotations

import json
from html import escape
from typing import Any, Sequence

from . import charts, niah
from .load import ModelResults
from .verdict import Finding, attention_findings, calibration_findings, head_findings, qa_findings

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}
.verdict li{margin:.35em 0}.muted{color:#666;font-size:.9em}code,pre{background:#f6f6f6;padding:.1em .3em}
pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    def cell(v: Any) -> str:
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f"<td class=\"num\">{escape(str(v))}</td>" if num else f"<td>{escape(str(v))}</td>"

    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return (f"<table class=\"{cls}\"><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{body}</tbody></table>")


def _img(uri: str, alt: str) -> str:
    return f"<img src=\"{uri}\" alt=\"{escape(alt)}\">"


def findings(m: ModelResults) -> list[Finding]:
    """Every verdict sentence of one model."""
    out = niah.task_findings(m.niah) if m.niah else []
    if m.attention:
        out += attention_findings(m.attention) + head_findings(m.attention)
    if m.qa:
        out += qa_findings(m.qa)
    if m.calibration:
        out += calibration_findings(m.calibration)
    if m.multidoc:
        from .multidoc import multidoc_findings

        out += multidoc_findings(m.multidoc)
    return out


def niah_table(models: Sequence[ModelResults]) -> str:
    """Cells found / cells and mean recall, per (task and) mode (rows) and model (columns)."""
    head, rows = niah.found_rows(models)
    return _table(head, rows, "niah")


def qa_table(models: Sequence[ModelResults]) -> str:
    rows = []
    for m in models:
        for variant, tables in m.qa.items():
            for task, r in tables.items():
                se = f"{r['stderr']:.3f}" if r.get("stderr") is not None else "–"
                rows.append([m.model, variant, task, r["metric"], f"{r['value']:.3f}", se, r.get("n") or "–"])
    return _table(["model", "variant", "task", "metric", "value", "standard error", "n"], rows, "qa")


def mtbench_table(m: ModelResults) -> str:
    """One row per MT-Bench condition (and judge) of a model: overall, per turn, categories side by side."""
    cats = list(dict.fromkeys(c for r in m.mtbench for c in r["categories"]))

    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.2f}"

    rows = [[r["condition"], r["judge"], f(r["score"]), f(r["turns"]["1"]), f(r["turns"]["2"])]
            + [f(r["categories"].get(c)) for c in cats] + [r["judged"], r["unjudged"]] for r in m.mtbench]
    return _table(["condition", "judge", "score", "turn 1", "turn 2", *cats, "judged", "unjudged"], rows, "mtbench")


def _provenance(m: ModelResults) -> str:
    parts = [f"<h3>{escape(m.model)}</h3>"]
    if m.versions:
        parts.append(_table(["package", "version"], sorted(m.versions.items())))
    if m.commands:
        parts.append("<p>Commands that reproduce each part:</p>" + _table(
            ["part", "command"], [(k, v) for k, v in m.commands.items()]))
    config = (m.study or {}).get("config") or m.niah_config
    if config:
        parts.append("<p>Configuration:</p><pre>" + escape(json.dumps(config, indent=1, default=str)) + "</pre>")
    if (m.study or {}).get("seconds"):
        parts.append("<p>Seconds per part: " + escape(", ".join(f"{k} {v:g}" for k, v in m.study["seconds"].items()))
                     + "</p>")
    parts.append("<p class=\"muted\">Sources: " + escape(", ".join(m.sources)) + "</p>")
    return "".join(parts)


def render_page(models: Sequence[ModelResults], generated: str) -> str:
    """The whole HTML page of ``models``."""
    names = ", ".join(m.model for m in models)
    body = [f"<h1>Context awareness report: {escape(names)}</h1>",
            f"<p class=\"muted\">Generated {escape(generated)} by ctxaware. A cell <em>finds</em> the needle when "
            "its answer recalls every keyword (recall 1).</p>", "<h2>Verdict</h2>"]
    for m in models:
        items = "".join(f"<li data-kind=\"{f.kind}\">{escape(f.text)}</li>" for f in findings(m))
        body.append(f"<h3>{escape(m.model)}</h3><ul class=\"verdict\">{items or '<li>no results</li>'}</ul>")
    with_niah = [m for m in models if m.niah]
    if with_niah:
        body += ["<h2>Needle in a haystack</h2>", niah_table(with_niah), "<h3>Heatmaps per mode</h3>"]
        series = {}
        for m in with_niah:
            tasks = niah.by_task(m.niah)
            for task, recs in tasks.items():
                title = f"{m.model} · needle {task} · haystack {recs[0].get('haystack', '')}"
                modes = list(dict.fromkeys(r["mode"] for r in recs))
                alt = f"NIH heatmaps of {m.model}" + (f", task {task}" if len(tasks) > 1 else "")
                body.append(_img(charts.heatmaps(recs, modes, title), alt))
                series[m.model if len(tasks) == 1 else f"{m.model} · {task}"] = recs
        modes = list(dict.fromkeys(mode for m in with_niah for mode in m.modes))
        thresholds = {niah.threshold(m.niah_config) for m in with_niah}
        line = thresholds.pop() if len(thresholds) == 1 else niah.DEFAULT_THRESHOLD
        head, rows = niah.effective_rows(with_niah)
        body += ["<h3>Effective length</h3><p>The longest tested length up to which the mean recall over depths "
                 "reaches the threshold at every tested length (none: already below it at the shortest).</p>",
                 _table(head, rows, "effective"), "<h3>Recall vs context length</h3>",
                 _img(charts.recall_vs_length(series, modes, threshold=line), "recall vs length")]
    with_att = [m for m in models if m.attention]
    if with_att:
        body.append("<h2>Attention by role</h2><p>Share of the answer-predicting query's attention (the last "
                    "token of the response prefix) on each role, per layer, with and without the chat template, "
                    "and on the retrieval head (the head with the most attention on the needle).</p>")
        for m in with_att:
            a = m.attention
            rows = [[cond] + [f"{100 * v:.1f} %" for v in (d.get("mean_shares") or {}).values()]
                    for cond, d in a["conditions"].items()]
            chans = list((next(iter(a["conditions"].values())).get("mean_shares") or {}))
            body += [f"<h3>{escape(m.model)}</h3>", _table(["condition"] + chans, rows, "attention"),
                     _img(charts.attention_roles(a, m.model), f"attention by role of {m.model}")]
            if all("head_user_shares" in a["conditions"].get(c, {}) for c in ("template", "no_template")):
                body.append(_img(charts.head_changes(a, m.model), f"user share per head of {m.model}"))
    if any(m.qa for m in models):
        body += ["<h2>Contextual QA</h2>", qa_table(models)]
    if any(m.multidoc for m in models):
        from ..multidoc.plot import positions_figure
        from ..multidoc.summary import position_rows, summarize

        body.append("<h2>Multi-document QA by gold position</h2><p>Accuracy (a gold answer contained in the short "
                    "answer) against the position of the document that holds the answer, among k distractors "
                    "from other articles; mean over questions and phrasings.</p>")
        for m in models:
            if m.multidoc:
                head, rows = position_rows(summarize(m.multidoc))
                body += [f"<h3>{escape(m.model)}</h3>", _table(head, rows, "multidoc"),
                         _img(charts.to_uri(positions_figure(m.multidoc, title=m.model)),
                              f"accuracy by gold position of {m.model}")]
    if any(m.mtbench for m in models):
        body.append("<h2>MT-Bench</h2><p>General ability next to context use: MT-Bench single-answer grading "
                    "(1–10) by the judge of each row, the mean over judged turns. A turn left without a rating "
                    "after the retries is counted as unjudged, never as 0. Scores by different judges are not "
                    "comparable (only a GPT-4 judge gives numbers comparable to the paper's).</p>")
        body += [f"<h3>{escape(m.model)}</h3>" + mtbench_table(m) for m in models if m.mtbench]
    cal = [m for m in models if m.calibration]
    for m in cal:
        c = m.calibration
        body += [f"<h2>Calibration: {escape(m.model)}</h2>",
                 _table(["field", "value"], [(k, v) for k, v in c["steering"].items()])]
        if c["rows"]:
            cols = list(c["rows"][0])[:8]
            body.append(_table(cols, [[r.get(k, "") for k in cols] for r in c["rows"][:20]]))
    if any(m.monitor for m in models):
        from .monitor import section

        body.append(section({m.model: m.monitor for m in models if m.monitor}))
    body.append("<h2>Provenance</h2>" + "".join(_provenance(m) for m in models))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ctxaware report: {escape(names)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
