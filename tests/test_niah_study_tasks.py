"""``ctxaware study --task``: every task in every mode into its own DIR/niah-<task>/, resumed; the report shows
one heatmap per task (one panel per mode), per-task verdicts and the effective lengths recomputed here."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_study import tiny  # noqa: F401 (the tiny model and tokenizer fixture)

from ctxaware.errors import ConfigError
from ctxaware.niah import read_records
from ctxaware.niah.scoring import effective_length
from ctxaware.report import load_results
from ctxaware.report.html import findings
from ctxaware.study import StudyConfig, run_study

torch.set_num_threads(1)


def _cfg(out, **kw) -> StudyConfig:
    base = dict(out=str(out), task="multi-query,literal-free", needle="multi-value", lengths="500,600", depths="50",
                max_new_tokens=3, attention_length=600, attention_depths="50", alpha=0.5, progress=False,
                effective_threshold=0.5, phrasings="0")  # one phrasing each (phrasings: tests/test_report.py)
    return StudyConfig(**{**base, **kw})


def test_study_runs_each_task_in_every_mode_and_reports_it(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    run = run_study(_cfg(tmp_path), model=model, tokenizer=tok, model_name="tiny")
    assert list(run.tasks) == ["multi-query", "literal-free"]
    modes = {"raw+prefix", "chat+prefix", "chat+prefix+steer", "chat"}
    for task in run.tasks:
        recs = read_records(tmp_path / f"niah-{task}")
        assert len(recs) == 8 and {r["mode"] for r in recs} == modes and {r["needle"] for r in recs} == {task}
        summary = json.loads((tmp_path / f"niah-{task}" / "summary.json").read_text())
        for mode in modes:  # the effective length recomputed from results.jsonl
            rows = [r for r in recs if r["mode"] == mode]
            assert summary["modes"][mode]["effective_length"] == effective_length(rows, 0.5)
    assert not (tmp_path / "niah").exists()
    study = json.loads((tmp_path / "study.json").read_text())
    assert "--needle literal-free" in study["commands"]["niah literal-free"]
    assert "--task multi-query,literal-free" in study["commands"]["study"]
    assert run.attention["retrieval_head"]["needle_mass"] > 0  # measured over the multi-value needles
    page = (tmp_path / "report.html").read_text()
    for task in run.tasks:
        assert f"NIH heatmaps of tiny, task {task}" in page
    (m,) = load_results([tmp_path])
    assert {r["needle"] for r in m.niah} == set(run.tasks) and len(m.niah) == 16
    texts = [f.text for f in findings(m) if f.kind in ("template", "steering", "prefix", "mode", "length")]
    assert texts and all(t.split(":")[0] in run.tasks for t in texts)
    for task in run.tasks:  # one effective-length row per task and mode, as in the summaries
        for mode in modes:
            eff = json.loads((tmp_path / f"niah-{task}" / "summary.json").read_text())["modes"][mode]
            shown = str(eff["effective_length"]) if eff["effective_length"] is not None else "none"
            row = rf"<td>tiny</td><td>{re.escape(task)}</td><td>{re.escape(mode)}</td><td>{shown}"
            assert re.search(row, page), (task, mode)
    import ctxaware.study.runner as runner

    monkeypatch.setattr(runner, "attention_by_role", lambda *a, **k: pytest.fail("attention measured again"))
    again = run_study(_cfg(tmp_path), model=model, tokenizer=tok, model_name="tiny")
    assert [r.new_cells for r in again.tasks.values()] == [0, 0]


def test_study_refuses_bad_task_lists_up_front(tmp_path):
    with pytest.raises(ConfigError, match="named twice"):
        _cfg(tmp_path, task="multi-key,multi-key")
    with pytest.raises(ConfigError, match="unknown needle"):
        _cfg(tmp_path, task="multi-kye")
    bad = tmp_path / "t.yaml"
    bad.write_text("needles: [A cat sat.]\nquestion: Who sat?\nkeywords: [dog]\n")
    with pytest.raises(ConfigError, match="keyword 'dog'"):
        _cfg(tmp_path, task=str(bad))
