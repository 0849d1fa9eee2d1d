"""Running a study: NIH modes, attention by role, optional QA, then the report — one model load.

Layout of ``DIR`` (``StudyConfig.out``)::

    study.json            configuration, versions, the commands that reproduce each part, timings
    niah/                 an NIH results directory (results.jsonl, manifest, summary, heatmaps)
    niah-<task>/          instead, with --task: one NIH results directory per task
    attention/attention.json
    qa/<variant>/results.json      (with --qa)
    mtbench/              answers.jsonl, judgments.jsonl, summary.json (with --mtbench-judge-url)
    report.html

Every part resumes: NIH cells by key, attention and QA by their settings. With ``--shard i/n`` only
that shard of every NIH grid runs (a later run without it merges); under ``accelerate launch`` every
process runs its shard of the NIH grids and the main process merges them and runs the other parts.
"""

from __future__ import annotations

import json
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
    attention: dict[str, Any] | None
    qa: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)  # NIH run per task (the needle's alone without --task)
    mtbench: dict[str, Any] = field(default_factory=dict)  # MT-Bench summary per condition


def commands(cfg: StudyConfig) -> dict[str, str]:
    """Shell commands that reproduce each part of the study."""
    def opt(name: str, value: Any) -> str:
        if isinstance(value, list):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return f"--{name.replace('_', '-')} {shlex.quote(str(value))}"

    common = [opt("model", cfg.model), opt("dtype", cfg.dtype)]
    engine = [] if cfg.engine == "transformers" else [
        opt(k, json.dumps(v) if isinstance(v, dict) else v) for k, v in cfg.engine_options().items()
        if v is not None and (k == "engine" or v != 1)]
    niah_commands = {}
    for task, n in cfg.niah_configs().items():
        niah = ["ctxaware niah", *common, opt("needle", task), opt("haystack", cfg.haystack),
                opt("lengths", n.grid_lengths()), opt("depths", n.grid_depths()), opt("modes", n.modes),
                opt("max_new_tokens", cfg.max_new_tokens), *engine]
        niah += [opt("steering", cfg.steering)] if cfg.steering else [opt("alpha", cfg.alpha), opt("heads", cfg.heads)]
        if cfg.effective_threshold != 0.85:
            niah.append(opt("effective_threshold", cfg.effective_threshold))
        name = "niah" if not cfg.task and task == cfg.needle else "niah " + task
        niah_commands[name] = " ".join(niah + [opt("out", n.out)])
    study = ["ctxaware study", *common, *engine, opt("out", cfg.out)]
    study += [opt("task", ",".join(cfg.task))] if cfg.task else []
    if cfg.qa:
        study += [opt("qa", ",".join(cfg.qa)), opt("qa_limit", cfg.qa_limit)]
        study += [opt("data_dir", cfg.data_dir)] if cfg.data_dir else []
    mtbench = []
    if cfg.mtbench_judge_url:  # the same options under ctxaware mtbench's names (plain chat; steered adds --alpha ...)
        names = {"mtbench_judge_url": "judge_base_url", "mtbench_judge_model": "judge_model", "mtbench_limit": "limit",
                 "mtbench_data_dir": "data_dir", "mtbench_max_new_tokens": "max_new_tokens"}
        given = [(k, getattr(cfg, k)) for k in names if getattr(cfg, k) is not None]
        study += [opt(k, v) for k, v in given]
        mtbench = ["ctxaware mtbench", opt("model", cfg.model)] + [opt(names[k], v) for k, v in given] + engine
        mtbench.append(opt("out", f"{cfg.out}/mtbench"))
    out = {"study": " ".join(study), **niah_commands, **({"mtbench": " ".join(mtbench)} if mtbench else {}),
           "report": f"ctxaware report {shlex.quote(cfg.out)} --out {shlex.quote(cfg.out + '/report.html')}"}
    if cfg.multidoc:
        md = cfg.multidoc_config()
        out["multidoc"] = " ".join(["ctxaware multidoc", *common, opt("data", md.data), opt("questions", md.questions),
                                    opt("k", md.k), opt("modes", md.modes), opt("out", md.out)]
                                   + ([opt("steering", md.steering)] if md.steering else
                                      [opt("alpha", md.alpha), opt("heads", md.heads)]))
    if cfg.qa:
        tasks = ",".join(f"ctxaware_{d}_no_ind,ctxaware_{d}_no_template" for d in cfg.qa)
        out["qa"] = " ".join(["ctxaware eval", opt("model", cfg.model), opt("tasks", tasks),
                              opt("limit", cfg.qa_limit)] + ([opt("data_dir", cfg.data_dir)] if cfg.data_dir else []))
    return out


def run_study(config: StudyConfig | None = None, *, model: Any = None, tokenizer: Any = None,
              model_name: str | None = None) -> StudyRun:
    """Run (or resume) every part of the study of ``config``; ``model``/``tokenizer`` reuse a loaded model."""
    from ..distributed import Launched, launched
    from ..niah.haystack import Haystack, read_haystack
    from ..niah.needles import load_needle
    from ..niah.results import versions
    from ..niah.runner import check_grid, run_niah, steering_config

    cfg = config or StudyConfig()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = cfg.niah_configs()
    ncfg = next(iter(parts.values()))
    steer = steering_config(ncfg) if cfg.steered else None
    needle = load_needle(cfg.needle)
    hay_text = read_haystack(cfg.haystack)
    launch = Launched() if cfg.shard is None and launched() else None
    if cfg.mtbench_judge_url and cfg.shard is None:
        from ..mtbench import check_judge

        check_judge(cfg.mtbench_configs()[0])  # an unreachable judge fails now, not after the NIH grid
    kwargs = load_kwargs(cfg)
    if launch is not None and not kwargs["device"] and not kwargs["device_map"]:
        kwargs["device"] = launch.device
    if model is None or tokenizer is None:
        from ..engines import load_for_engine

        # --engine vllm: tokenizer and config only (the NIH and MT-Bench parts run in vLLM); the transformers
        # model is loaded after them, for the attention and QA parts
        loaded = load_for_engine(cfg) if cfg.engine != "transformers" else None
        if loaded is None:
            from ..models import load_model

            loaded = load_model(cfg.model, **kwargs)
        model, tokenizer, model_name = loaded.model, loaded.tokenizer, model_name or loaded.name
    model_name = model_name or cfg.model
    for part in parts.values():
        check_grid(part, model, steer)  # before any part runs: window, heads
    seconds: dict[str, float] = {}
    meta = {"config": cfg.to_dict(), "model": model_name, "versions": versions(), "commands": commands(cfg)}
    if launch is None or launch.main:
        write_json(out / STUDY_FILE, meta)

    t0 = time.perf_counter()
    tasks = {task: run_niah(part, model=model, tokenizer=tokenizer, model_name=model_name)
             for task, part in parts.items()}
    niah = next(iter(tasks.values()))
    seconds["niah"] = time.perf_counter() - t0
    if cfg.shard is not None or (launch is not None and not launch.main):
        return StudyRun(out=out, niah=niah, attention=None, seconds=seconds, tasks=tasks)  # the main merges

    mtbench: dict[str, Any] = {}

    def run_mtbench_part() -> None:
        from ..mtbench import run_mtbench

        t0 = time.perf_counter()
        for mcfg in cfg.mtbench_configs():
            summary = run_mtbench(mcfg, model=model, tokenizer=tokenizer, model_name=model_name).summary
            mtbench[summary["condition"]] = summary
        seconds["mtbench"] = time.perf_counter() - t0

    if cfg.engine != "transformers":  # the generating parts first, then vLLM is shut down for the transformers parts
        if cfg.mtbench_judge_url:
            run_mtbench_part()
        from ..engines import ConfigOnlyModel
        from ..vllm.generate import release

        release()
        if isinstance(model, ConfigOnlyModel):
            from ..models import load_model

            model = load_model(cfg.model, **kwargs).model

    t0 = time.perf_counter()
    from ..identity import device_class, model_dtype, model_ref, result_identity

    settings = {"model": model_name, "identity": result_identity(  # model content, dtype, device, prompts' source
        "attention", model=model_ref(cfg.model, model_name, given=True), dtype=model_dtype(model),
        device=device_class(model), extra={"needle": needle.to_dict(), "haystack": hay_text.id,
                                           "length": cfg.attention_length, "depths": cfg.attention_depths,
                                           "reserve": ncfg.reserve, "system": ncfg.system}).to_dict()}
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
                    steering=steer, progress=cfg.progress, model_ref=cfg.model)
        seconds["qa"] = time.perf_counter() - t0
    if cfg.multidoc:
        from ..multidoc import run_multidoc

        t0 = time.perf_counter()
        run_multidoc(cfg.multidoc_config(), model=model, tokenizer=tokenizer, model_name=model_name)
        seconds["multidoc"] = time.perf_counter() - t0
    if cfg.mtbench_judge_url and cfg.engine == "transformers":
        run_mtbench_part()
    write_json(out / STUDY_FILE, {**meta, "seconds": {k: round(v, 1) for k, v in seconds.items()}})
    report = None
    if cfg.report:
        from ..report import build_report

        report = build_report([out], out / "report.html")
    return StudyRun(out=out, niah=niah, attention=attention, qa=qa, report=report, seconds=seconds, tasks=tasks,
                    mtbench=mtbench)
