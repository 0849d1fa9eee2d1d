"""Running a study: NIH modes, attention by role, optional QA, then the report — one model load.

Layout of ``DIR`` (``StudyConfig.out``)::

    study.json            configuration, versions, the commands that reproduce each part, timings
    niah/                 an NIH results directory (results.jsonl, manifest, summary, heatmaps)
    attention/attention.json
    qa/<variant>/results.json      (with --qa)
    report.html

Every part resumes: NIH cells by key, attention and QA by their settings.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_kwargs
from .attention import FILENAME, attention_by_role, read_json, write_json
from .config import StudyConfig

logger = logging.getLogger(__name__)
STUDY_FILE = "study.json"


@dataclass
class StudyRun:
    """What :func:`run_study` returns."""

    out: Path
    niah: Any
    attention: dict[str, Any]
    qa: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def commands(cfg: StudyConfig) -> dict[str, str]:
    """Shell commands that reproduce each part of the study."""
    def opt(name: str, value: Any) -> str:
        if isinstance(value, list):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return f"--{name.replace('_', '-')} {shlex.quote(str(value))}"

    n = cfg.niah_config()
    common = [opt("model", cfg.model), opt("dtype", cfg.dtype)]
    niah = ["ctxaware niah", *common, opt("needle", cfg.needle), opt("haystack", cfg.haystack),
            opt("lengths", n.grid_lengths()), opt("depths", n.grid_depths()), opt("modes", n.modes),
            opt("max_new_tokens", cfg.max_new_tokens)]
    niah += [opt("steering", cfg.steering)] if cfg.steering else [opt("alpha", cfg.alpha), opt("heads", cfg.heads)]
    study = ["ctxaware study", *common, opt("out", cfg.out)]
    if cfg.qa:
        study += [opt("qa", ",".join(cfg.qa)), opt("qa_limit", cfg.qa_limit)]
        study += [opt("data_dir", cfg.data_dir)] if cfg.data_dir else []
    out = {"study": " ".join(study), "niah": " ".join(niah + [opt("out", n.out)]),
           "report": f"ctxaware report {shlex.quote(cfg.out)} --out {shlex.quote(cfg.out + '/report.html')}"}
    if cfg.qa:
        tasks = ",".join(f"ctxaware_{d}_no_ind,ctxaware_{d}_no_template" for d in cfg.qa)
        out["qa"] = " ".join(["ctxaware eval", opt("model", cfg.model), opt("tasks", tasks),
                              opt("limit", cfg.qa_limit)] + ([opt("data_dir", cfg.data_dir)] if cfg.data_dir else []))
    return out


def run_study(config: StudyConfig | None = None, *, model: Any = None, tokenizer: Any = None,
              model_name: str | None = None) -> StudyRun:
    """Run (or resume) every part of the study of ``config``; ``model``/``tokenizer`` reuse a loaded model."""
    from ..niah.haystack import Haystack, read_haystack
    from ..niah.needles import load_needle
    from ..niah.results import versions
    from ..niah.runner import check_grid, run_niah, steering_config

    cfg = config or StudyConfig()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ncfg = cfg.niah_config()
    steer = steering_config(ncfg) if cfg.steered else None
    needle = load_needle(cfg.needle)
    hay_text = read_haystack(cfg.haystack)
    if model is None or tokenizer is None:
        from ..models import load_model

        loaded = load_model(cfg.model, **load_kwargs(cfg))
        model, tokenizer, model_name = loaded.model, loaded.tokenizer, model_name or loaded.name
    model_name = model_name or cfg.model
    check_grid(ncfg, model, steer)  # before any part runs: window, heads
    seconds: dict[str, float] = {}
    meta = {"config": cfg.to_dict(), "model": model_name, "versions": versions(), "commands": commands(cfg)}
    write_json(out / STUDY_FILE, meta)

    t0 = time.perf_counter()
    niah = run_niah(ncfg, model=model, tokenizer=tokenizer, model_name=model_name)
    seconds["niah"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    settings = {"model": model_name, "needle": needle.to_dict(), "haystack": hay_text.id,
                "length": cfg.attention_length, "depths": cfg.attention_depths}
    att_path = out / "attention" / FILENAME
    attention = read_json(att_path)
    if not attention or attention.get("settings") != settings:
        hay = Haystack(hay_text, tokenizer)
        attention = attention_by_role(model, tokenizer, hay, needle, cfg.attention_length, cfg.attention_depths,
                                      reserve=ncfg.reserve, system=ncfg.system, progress=cfg.progress)
        attention = {"settings": settings, "model": model_name, **attention}
        write_json(att_path, attention)
    seconds["attention"] = time.perf_counter() - t0

    qa: dict[str, Any] = {}
    if cfg.qa:
        from .qa import run_qa

        t0 = time.perf_counter()
        qa = run_qa(model, tokenizer, model_name, cfg.qa, out / "qa", limit=cfg.qa_limit, data_dir=cfg.data_dir,
                    steering=steer, progress=cfg.progress)
        seconds["qa"] = time.perf_counter() - t0
    write_json(out / STUDY_FILE, {**meta, "seconds": {k: round(v, 1) for k, v in seconds.items()}})
    report = None
    if cfg.report:
        from ..report import build_report

        report = build_report([out], out / "report.html")
    return StudyRun(out=out, niah=niah, attention=attention, qa=qa, report=report, seconds=seconds)
