"""Reading result directories for the report: study, NIH, attention, eval (lm-eval) and calibration.

``load_results(dirs)`` looks at each directory and its immediate sub-directories and returns one
:class:`ModelResults` per model, in the order first seen, gathering every kind of result found:

- study: ``study.json`` (+ ``niah/`` or ``niah-<task>/``, ``attention/attention.json``, ``qa/*/results.json``);
- NIH: ``results.jsonl`` + ``manifest.json`` (``ctxaware niah``);
- attention: ``attention.json`` (a study's) or a JSON file of ``ctxaware attention --json``;
- eval: ``results.json`` of ``ctxaware eval`` (lm-eval's layout);
- calibration: ``steering.yaml`` (+ ``search.json``) of ``ctxaware calibrate``;
- MT-Bench: ``answers.jsonl`` + ``summary.json`` of ``ctxaware mtbench`` (a study's ``mtbench/``), one
  summary per condition and judge;
- training probes: ``context_awareness.jsonl`` of ``ctxaware train --monitor`` (a run's output directory,
  or an sft-study arm's ``model/``), read by :mod:`.monitor`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError, InputFileNotFoundError


@dataclass
class ModelResults:
    """Everything the report knows about one model."""

    model: str
    niah: list[dict[str, Any]] = field(default_factory=list)  # NIH records
    niah_dirs: list[Path] = field(default_factory=list)
    niah_config: dict[str, Any] = field(default_factory=dict)
    niah_identity: dict[str, Any] | None = None  # result identity of its NIH cells (ctxaware.identity)
    attention: dict[str, Any] | None = None
    qa: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> {task: row}
    multidoc: list[dict[str, Any]] = field(default_factory=list)  # multi-document QA records (ctxaware multidoc)
    calibration: dict[str, Any] | None = None
    mtbench: list[dict[str, Any]] = field(default_factory=list)  # one summary per (condition, judge)
    monitor: list[dict[str, Any]] = field(default_factory=list)  # training probes (context_awareness.jsonl)
    study: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(r["mode"] for r in self.niah))


def niah_command(config: dict[str, Any], out: Path) -> str:
    """The ``ctxaware niah`` command line that reproduces a NIH directory from its manifest's config."""
    import shlex

    from ..niah.config import NiahConfig

    defaults = NiahConfig().to_dict()
    parts = ["ctxaware niah"]
    for k, v in config.items():
        if k in ("out", "progress", "overwrite") or v == defaults.get(k) or v is None:
            continue
        if isinstance(v, bool):
            parts.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
            continue
        if isinstance(v, list):
            v = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        parts.append(f"--{k.replace('_', '-')} {shlex.quote(str(v))}")
    return " ".join(parts + [f"--out {shlex.quote(str(out))}"])


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable JSON ({exc}); rerun the command that writes it") from None


def _is_multidoc(d: Path) -> bool:
    """Whether ``d`` holds ``ctxaware multidoc`` results (its manifest's identity kind)."""
    try:
        return (_json(d / "manifest.json").get("identity") or {}).get("kind") == "multidoc"
    except (InputError, AttributeError, OSError):
        return False


class _Collector:
    def __init__(self) -> None:
        self.models: dict[str, ModelResults] = {}

    def get(self, model: str) -> ModelResults:
        return self.models.setdefault(model, ModelResults(model=model))

    def niah(self, d: Path) -> str:
        from ..niah.results import read_records

        records = read_records(d)
        if not records:
            raise InputError(f"{d}: results.jsonl has no finished NIH cells")
        manifest = _json(d / "manifest.json") if (d / "manifest.json").is_file() else {}
        if isinstance(manifest.get("keys"), list):  # the last run's cells: never blended with other steering/grids
            keys = set(manifest["keys"])
            records = [r for r in records if r.get("key") in keys] or records
        model = records[0].get("model", "?")
        ident = manifest.get("identity")
        other = self.models.get(model)
        from ..identity import Identity

        # tasks and phrasings of one study differ only in the needle: one model, one row
        differ = [f for f in Identity.from_dict(ident).diff(other.niah_identity) if not f.startswith("extra.needle")] \
            if ident and other is not None and other.niah_identity else []
        if differ:
            # the same model name with another dtype, device, model content, ...: its own row, never a blend
            field_name = differ[0]
            value = ident
            for part in field_name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            model = f"{model} [{field_name.split('.')[-1]}={value}]"
            records = [{**r, "model": model} for r in records]
        m = self.get(model)
        m.niah_identity = m.niah_identity or ident
        seen = {r["key"] for r in m.niah}
        m.niah += [r for r in records if r.get("key") not in seen]
        m.niah_dirs.append(d)
        m.niah_config = manifest.get("config") or manifest.get("study") or m.niah_config
        m.versions = manifest.get("versions") or m.versions
        if manifest.get("config"):
            m.commands.setdefault("niah", niah_command(manifest["config"], d))
        m.sources.append(str(d))
        return model

    def multidoc(self, d: Path, model: str | None = None) -> str:
        from ..niah.results import read_records

        records = read_records(d)
        manifest = _json(d / "manifest.json") if (d / "manifest.json").is_file() else {}
        if isinstance(manifest.get("keys"), list):  # the last run's plan, never a blend with older plans' answers
            keys = set(manifest["keys"])
            records = [r for r in records if r.get("key") in keys] or records
        if not records:
            raise InputError(f"{d}: results.jsonl has no finished multi-document QA answers")
        model = model or records[0].get("model", "?")
        m = self.get(model)
        seen = {r["key"] for r in m.multidoc}
        m.multidoc += [r for r in records if r.get("key") not in seen]
        m.sources.append(str(d))
        return model

    def attention(self, path: Path, model: str | None = None) -> None:
        data = _json(path)
        if "conditions" not in data:
            raise InputError(f"{path}: not an attention result (no 'conditions')")
        m = self.get(data.get("model") or model or "?")
        m.attention = data
        m.sources.append(str(path))

    def qa(self, path: Path, model: str | None = None) -> None:
        from ..study.qa import qa_tables

        data = _json(path)
        tables = qa_tables(data) if data.get("results") else data.get("tables")
        if not tables:
            raise InputError(f"{path}: no QA metrics in it")
        variant = data.get("variant") or path.parent.name
        name = model or (data.get("settings") or {}).get("model") or \
            str((data.get("config") or {}).get("model_args") or "?")
        self.get(name).qa[variant] = tables
        self.get(name).sources.append(str(path))

    def calibration(self, d: Path, model: str | None = None) -> None:
        from ..steering.file import read_steering_file

        config, meta = read_steering_file(d / "steering.yaml")
        m = self.get(model or meta.get("model") or "?")
        search = _json(d / "search.json") if (d / "search.json").is_file() else {}
        m.calibration = {"steering": config.to_dict(), "meta": meta, "rows": search.get("rows", [])}
        m.sources.append(str(d))

    def mtbench(self, d: Path) -> None:
        from ..mtbench import read_mtbench

        for run in read_mtbench(d)["runs"]:
            m = self.get(run["model"])
            row = (run["condition"], run["judge"], run.get("judge_url"))  # one row per (model, condition, judge)
            m.mtbench = [r for r in m.mtbench if (r["condition"], r["judge"], r.get("judge_url")) != row]
            m.mtbench.append({**run, "dir": str(d)})
            if str(d) not in m.sources:
                m.sources.append(str(d))

    def monitor(self, path: Path, model: str) -> None:
        from .monitor import read_monitor

        records = read_monitor(path)
        if not records:
            raise InputError(f"{path}: no finished probe in it")
        m = self.get(model)
        m.monitor = records
        m.sources.append(str(path))

    def study(self, d: Path) -> None:
        data = _json(d / "study.json")
        model = data.get("model") or "?"
        if (d / "niah" / "results.jsonl").is_file():
            model = self.niah(d / "niah")
        for task_dir in sorted(p.parent for p in d.glob("niah-*/results.jsonl")):  # study --task: one per task
            model = self.niah(task_dir)
        m = self.get(model)
        m.study, m.commands = data, data.get("commands", {})
        from .monitor import monitor_path

        if monitor_path(d):  # an sft-study arm: its training run's probes (DIR/<arm>/model/)
            self.monitor(monitor_path(d), model)
        m.versions = data.get("versions") or m.versions
        if (d / "attention" / "attention.json").is_file():
            self.attention(d / "attention" / "attention.json", model)
        for p in sorted((d / "qa").glob("*/results.json")):
            self.qa(p, model)
        if (d / "mtbench" / "answers.jsonl").is_file():
            self.mtbench(d / "mtbench")
        if (d / "multidoc" / "results.jsonl").is_file():
            self.multidoc(d / "multidoc", model)

    def directory(self, d: Path, top: bool = True) -> bool:
        if (d / "study.json").is_file():
            self.study(d)
            return True
        found = False
        if (d / "results.jsonl").is_file() and _is_multidoc(d):
            self.multidoc(d)
            found = True
        elif (d / "results.jsonl").is_file():
            self.niah(d)
            found = True
        if (d / "attention.json").is_file():
            self.attention(d / "attention.json")
            found = True
        if (d / "results.json").is_file():
            self.qa(d / "results.json")
            found = True
        if (d / "context_awareness.jsonl").is_file():  # a training run's output dir (ctxaware train --monitor)
            self.monitor(d / "context_awareness.jsonl", d.parent.name if d.name == "model" else d.name)
            found = True
        if (d / "steering.yaml").is_file():
            self.calibration(d)
            found = True
        if (d / "answers.jsonl").is_file() and (d / "summary.json").is_file():
            self.mtbench(d)
            found = True
        if not found and top:
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                found = self.directory(sub, top=False) or found
        return found


def load_results(dirs: Iterable[str | Path]) -> list[ModelResults]:
    """One :class:`ModelResults` per model found in ``dirs`` (see the module doc)."""
    c = _Collector()
    for d in map(Path, dirs):
        if d.is_file() and d.suffix == ".json":
            c.attention(d)
            continue
        if not d.is_dir():
            raise InputFileNotFoundError(f"no result directory {d}; give study, niah, attention, eval, "
                                         "calibration or mtbench output directories")
        if not c.directory(d):
            raise InputError(f"{d}: no results found (expected study.json, results.jsonl, attention.json, "
                             "results.json, steering.yaml, answers.jsonl + summary.json or context_awareness.jsonl)")
    return list(c.models.values())
