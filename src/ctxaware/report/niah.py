"""The report's NIH numbers per task: verdicts, found-cell table rows and effective lengths (no HTML here).

A model's NIH records may hold several tasks (the ``needle`` of each record: ``SF``, ``multi-key``,
a task file's name, ...), e.g. a study run with ``--task``. Each task is judged on its own: its
verdict sentences start with the task's name when there are several, its heatmaps and its row of
effective lengths are its own. The effective length is the one of
:func:`ctxaware.niah.scoring.effective_length` at the threshold of the run (its manifest's
``effective_threshold``, else 0.85).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..niah.scoring import effective_length, recall_by_length
from .verdict import Finding, cells_by_mode, lost, niah_findings, phrasing_findings

DEFAULT_THRESHOLD = 0.85


def by_task(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by task (the record's ``needle``), in the order first seen."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(str(r.get("needle", "?")), []).append(r)
    return out


def threshold(config: dict[str, Any] | None) -> float:
    """The effective-length threshold of a run's configuration (0.85 when it names none)."""
    value = (config or {}).get("effective_threshold")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else DEFAULT_THRESHOLD


def task_findings(records: Sequence[dict[str, Any]]) -> list[Finding]:
    """The NIH verdict of each task (prefixed with its name when there are several), and how often the answers
    of a task with distractors recalled a distractor's value."""
    tasks = by_task(records)
    out: list[Finding] = []
    for task, rows in tasks.items():
        found = niah_findings(rows)
        if len(tasks) > 1:
            found = [dataclasses.replace(f, text=f"{task}: {f.text}", numbers={**f.numbers, "task": task})
                     for f in found]
        out += found
        if any("distracted" in r for r in rows):
            modes = list(dict.fromkeys(r["mode"] for r in rows))
            per = {m: (sum(1 for r in rows if r["mode"] == m and r.get("distracted")),
                       sum(1 for r in rows if r["mode"] == m)) for m in modes}
            text = ", ".join(f"{m} {a}/{n}" for m, (a, n) in per.items())
            out.append(Finding("distracted", f"{task}: answers that recall a distractor's value instead of (or "
                                             f"besides) the needle's: {text}.",
                               {"task": task, "distracted": {m: a for m, (a, _) in per.items()},
                                "cells": {m: n for m, (_, n) in per.items()}}))
    return out + phrasing_findings(records)


def found_rows(models: Sequence[Any]) -> tuple[list[str], list[list[Any]]]:
    """Head and rows of the table of cells found / cells and mean recall per (task and) mode and model."""
    tasks = list(dict.fromkeys(t for m in models for t in by_task(m.niah)))
    several = len(tasks) > 1
    rows = []
    for task in tasks:
        groups = [by_task(m.niah).get(task, []) for m in models]
        modes = list(dict.fromkeys(r["mode"] for g in groups for r in g))
        for mode in modes:
            row: list[Any] = ([task] if several else []) + [mode]
            for g in groups:
                cells = cells_by_mode(g).get(mode)
                if not cells:
                    row += ["–", "–"]
                    continue
                row += [f"{len(cells) - len(lost(cells))}/{len(cells)}", f"{sum(cells.values()) / len(cells):.3f}"]
            rows.append(row)
    head = (["task"] if several else []) + ["mode"] + [h for m in models
                                                       for h in (f"{m.model}: needle found", "mean recall")]
    return head, rows


def effective_rows(models: Sequence[Any]) -> tuple[list[str], list[list[Any]]]:
    """Head and rows of the effective-length table: one row per model, task and mode, with the mean recall of
    every tested length."""
    rows = []
    lengths = sorted({int(r["length"]) for m in models for r in m.niah})
    for m in models:
        t = threshold(m.niah_config)
        for task, recs in by_task(m.niah).items():
            for mode in dict.fromkeys(r["mode"] for r in recs):
                mine = [r for r in recs if r["mode"] == mode]
                eff = effective_length(mine, t)
                per = recall_by_length(mine)
                shown = str(eff) if eff is not None else f"none (< {t:g} at {min(per)})"
                rows.append([m.model, task, mode, shown, f"{t:g}"]
                            + [f"{per[L]:.2f}" if L in per else "–" for L in lengths])
    return ["model", "task", "mode", "effective length", "threshold"] + [f"recall @ {L}" for L in lengths], rows
