"""Running an sft-study: data → score → label → train two arms → evaluate both → report, each stage resumable.

Layout of ``DIR`` (``SftStudyConfig.out``)::

    sft_study.json        configuration, versions, each stage's record and timing, the arms' settings
    data/                 input.jsonl, scored.jsonl, labelled.jsonl (see :mod:`.stages`)
    vanilla/              model/ (trained, with checkpoint-*), study.json, niah/, attention/, qa/, mtbench/
    conditional/          the same, NIH modes also with +ind, QA also chat+ind
    report.html

Both arms train from the same base with the same recipe, seed, steps and data file (read in its
order): ``vanilla`` with ``[IND]`` stripped and no ``[IND]`` token added, ``conditional`` with
``[IND]`` as a trained special token. A stage recorded as done in ``sft_study.json`` is skipped on
a rerun; a kill during training resumes from the arm's newest complete checkpoint, a kill during
evaluation from the NIH cells and QA variants already written. ``seconds`` in ``sft_study.json``
sum the wall time of each stage over the runs that did its work (a killed run's share of a
training is lost with it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputFileNotFoundError
from ..fsio import atomic_write_json
from .config import ARMS, SftStudyConfig

logger = logging.getLogger(__name__)
STATE_FILE = "sft_study.json"
#: TrainConfig fields allowed to differ between the arms (everything else must be equal)
ARM_FIELDS = ("indicator", "add_indicator_token", "output_dir")
#: SftStudyConfig fields that define the data and the trained arms: a rerun must keep them
IDENTITY = ("dataset", "model", "template_file", "max_examples", "probe", "score_max_length", "target_fraction",
            "threshold", "recipe", "lora", "max_steps", "seed", "train_args")


@dataclass
class SftStudyRun:
    """What :func:`run_sft_study` returns."""

    out: Path
    state: dict[str, Any]
    report: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _read_state(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def arm_config(cfg: SftStudyConfig, arm: str, labelled: Path):
    """The :class:`~ctxaware.training.config.TrainConfig` of one arm (the same for both but ARM_FIELDS)."""
    from ..training.config import load_recipe

    recipe = load_recipe(cfg.recipe)
    over: dict[str, Any] = dict(cfg.train_args)
    if cfg.lora is not None:
        over["method"] = "lora" if cfg.lora else "full"
    if cfg.max_steps is not None:
        over["max_steps"] = cfg.max_steps
    if cfg.seed is not None:
        over["seed"] = cfg.seed
    if cfg.template_file:
        over["chat_template"] = cfg.template_file
    over.setdefault("monitor", cfg.monitor)  # the monitor leaves training unchanged (tested): not in IDENTITY
    if cfg.monitor_every is not None:
        over.setdefault("monitor_every", cfg.monitor_every)
    # the arms read labelled.jsonl in its order (fixed once, from text without [IND]); the Trainer's own
    # length grouping would sort each arm by its own lengths, which [IND] changes
    sft = {**recipe.sft, **over.pop("sft", {}), "train_sampling_strategy": "sequential"}
    return recipe.replace(**over, sft=sft, model=cfg.model, dataset=str(labelled),
                          output_dir=str(Path(cfg.out) / arm / "model"), indicator=arm == "conditional",
                          add_indicator_token=arm == "conditional", allow_no_indicator=False,
                          resume_from_checkpoint="auto", progress=cfg.progress)


def compare_settings(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"equal": {field: value}, "differ": {field: {arm: value}}}`` of the arms' training configs.

    Raises ``ConfigError`` when a field other than :data:`ARM_FIELDS` differs.
    """
    a, b = (configs[arm] for arm in ARMS)
    equal = {k: v for k, v in a.items() if b.get(k) == v}
    differ = {k: {arm: configs[arm].get(k) for arm in ARMS} for k in sorted(set(a) | set(b)) if k not in equal}
    bad = [k for k in differ if k not in ARM_FIELDS]
    if bad:
        raise ConfigError(f"the arms' training settings differ in {', '.join(bad)}; they must be equal")
    return {"equal": equal, "differ": differ}


def _train_arm(cfg: SftStudyConfig, arm: str, labelled: Path) -> dict[str, Any]:
    from ..training.conditions import INDICATOR, indicator_token_id
    from ..training.trainer import train

    tcfg = arm_config(cfg, arm, labelled)
    t0 = time.perf_counter()
    result = train(tcfg)
    seconds = time.perf_counter() - t0
    from ..models import load_tokenizer

    tok = load_tokenizer(result.output_dir)
    return {"done": True, "output_dir": result.output_dir, "adapter": result.adapter,
            "indicator_id": result.indicator_id, "tokenizer_has_indicator": indicator_token_id(tok, INDICATOR) is not None,
            "vocab": len(tok), "examples": result.data.num_examples, "tokens": result.data.num_tokens,
            "supervised_tokens": result.data.num_supervised, "dropped": result.data.num_dropped,
            "truncated": result.data.num_truncated, "steps": int(result.metrics.get("global_step", 0)),
            "train_loss": result.metrics.get("train_loss"), "resumed_from": result.resumed_from,
            "seconds": round(seconds, 1), "losses": [h["loss"] for h in result.log_history if "loss" in h],
            "monitor": result.monitor}


def study_config(cfg: SftStudyConfig, arm: str, model_dir: str) -> Any:
    """The :class:`~ctxaware.study.StudyConfig` (NIH + attention) of one arm's evaluation."""
    from ..study import StudyConfig

    return StudyConfig(model=model_dir, out=str(Path(cfg.out) / arm), needle=cfg.needle, haystack=cfg.haystack,
                       lengths=cfg.lengths, depths=cfg.depths, modes=",".join(cfg.arm_modes(arm)),
                       max_new_tokens=cfg.max_new_tokens, attention_length=cfg.attention_length,
                       attention_depths=cfg.attention_depths, batch_size=cfg.batch_size, dtype=cfg.dtype,
                       device=cfg.device, report=False, progress=cfg.progress, **cfg.engine_options())


def validate(cfg: SftStudyConfig) -> None:
    """Resolve and check the whole study before any stage: the dataset and template files, both arms' training
    configs (recipe and overrides), their NIH/attention evaluation (lengths, depths, modes, needle and haystack
    files) — so that a bad value fails in a second, not after scoring, labelling and training an arm."""
    from ..config import check_local_input
    from ..niah.haystack import check_haystack
    from ..niah.needles import load_needle

    check_local_input(cfg.dataset, "dataset")
    check_local_input(cfg.template_file, "template file")
    for name in ("data_dir", "mtbench_data_dir"):
        value = getattr(cfg, name, None)
        if value and not Path(value).expanduser().is_dir():
            raise InputFileNotFoundError(f"{name.replace('_', '-')} {value!r} is not a directory")
    load_needle(cfg.needle)
    check_haystack(cfg.haystack)
    for arm in ARMS:  # the cheap checks first
        study_config(cfg, arm, str(Path(cfg.out) / arm / "model"))
    for arm in ARMS:
        arm_config(cfg, arm, Path(cfg.out) / "data" / "labelled.jsonl")


def _evaluate_arm(cfg: SftStudyConfig, arm: str, model_dir: str) -> dict[str, Any]:
    """NIH + attention (through ``run_study``), QA, optional MT-Bench of one trained arm; resumable."""
    from ..models import load_model
    from ..study import StudyConfig, run_study
    from ..study.qa import run_qa

    out = Path(cfg.out) / arm
    vllm = cfg.engine != "transformers"  # NIH and MT-Bench through vLLM (the arm merged once), the rest on transformers
    loaded = None if vllm else load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
    scfg = study_config(cfg, arm, model_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    study = run_study(scfg, model=loaded.model if loaded else None, tokenizer=loaded.tokenizer if loaded else None,
                      model_name=arm)
    seconds.update(study.seconds)
    if loaded is None and cfg.qa:
        loaded = load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
    record: dict[str, Any] = {"niah_cells": len(study.niah.records), "modes": cfg.arm_modes(arm)}
    if cfg.qa:
        t0 = time.perf_counter()
        qa = run_qa(loaded.model, loaded.tokenizer, arm, cfg.qa, out / "qa", limit=cfg.qa_limit,
                    data_dir=cfg.data_dir, progress=cfg.progress, variants=cfg.qa_variants(arm), model_ref=model_dir)
        seconds["qa"] = time.perf_counter() - t0
        record["qa"] = {v: r["tables"] for v, r in qa.items()}
    if cfg.mtbench_judge_url:
        from ..mtbench import MtBenchConfig, run_mtbench  # only with a judge (its client needs httpx)

        t0 = time.perf_counter()
        mcfg = MtBenchConfig(model=model_dir, out=str(out / "mtbench"), judge_base_url=cfg.mtbench_judge_url,
                             judge_model=cfg.mtbench_judge_model, indicator=False, limit=cfg.mtbench_limit,
                             max_new_tokens=cfg.mtbench_max_new_tokens, data_dir=cfg.mtbench_data_dir,
                             dtype=cfg.dtype, progress=cfg.progress, **cfg.engine_options())
        record["mtbench"] = run_mtbench(mcfg, model=loaded.model if loaded else None,
                                        tokenizer=loaded.tokenizer if loaded else None, model_name=arm).summary
        seconds["mtbench"] = time.perf_counter() - t0
    if vllm:
        from ..vllm.generate import release

        release()  # the next arm's model gets the memory
    record["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    del loaded
    return record


def run_sft_study(config: SftStudyConfig) -> SftStudyRun:
    """Run (or resume) every stage of ``config``; see the module doc for the layout."""
    from ..niah.results import versions
    from . import stages

    cfg = config
    if not cfg.dataset:
        raise ConfigError("no dataset: pass --dataset FILE (JSONL messages) or a Hugging Face dataset name")
    validate(cfg)  # everything, before any file is written
    out = Path(cfg.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    path = out / STATE_FILE
    state = _read_state(path)
    old = state.get("config") or {}
    now = cfg.to_dict()
    changed = [k for k in IDENTITY if old and old.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"{path} was written with different {', '.join(changed)}; rerun with the same "
                          "options or another --out")
    state.update(config=now, versions=versions())
    st = state.setdefault("stages", {})
    secs = state.setdefault("seconds", {})

    def save() -> None:
        atomic_write_json(path, state)

    recipe = arm_config(cfg, "vanilla", data / "labelled.jsonl")  # validates recipe and overrides up front
    seed = recipe.seed
    if not st.get("data"):
        st["data"] = stages.sample_rows(cfg, seed, data / "input.jsonl")
        save()
    scored = data / ("input.jsonl" if st["data"].get("scored") else "scored.jsonl")
    if not st.get("score"):
        t0 = time.perf_counter()
        st["score"] = ({"probe": None, "scores": f"ctx_scores of {cfg.dataset}"} if st["data"].get("scored")
                       else stages.score(cfg, data / "input.jsonl", scored))
        secs["score"] = round(time.perf_counter() - t0, 1)
        save()
    if not st.get("label"):
        st["label"] = stages.label(cfg, scored, data / "labelled.jsonl", seed=seed,
                                   batch=recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps)
        save()
        logger.info("labelled %d of %d scored turns (%.3f)", st["label"]["labelled_turns"],
                    st["label"]["scored_turns"], st["label"]["fraction_labelled"])
    train = st.setdefault("train", {})
    configs = {arm: arm_config(cfg, arm, data / "labelled.jsonl").to_dict() for arm in ARMS}
    state["settings"] = compare_settings(configs)
    save()
    for arm in ARMS:
        if not (train.get(arm) or {}).get("done"):
            train[arm] = {"done": False}
            save()
            train[arm] = _train_arm(cfg, arm, data / "labelled.jsonl")
            secs[f"train_{arm}"] = round(secs.get(f"train_{arm}", 0.0) + train[arm]["seconds"], 1)
            save()
    state["settings"]["data"] = {k: {arm: train[arm][k] for arm in ARMS}
                                 for k in ("examples", "supervised_tokens", "dropped", "steps")}
    unequal = [k for k, v in state["settings"]["data"].items() if len(set(v.values())) > 1]
    if unequal:  # e.g. a conversation cut to no answer token in one arm only (its [IND] pushed it past max_length)
        logger.warning("the arms trained on different %s: see sft_study.json settings.data", ", ".join(unequal))
    state["settings"]["data_equal"] = not unequal
    save()
    evals = st.setdefault("eval", {})
    for arm in ARMS:
        t0 = time.perf_counter()
        evals[arm] = _evaluate_arm(cfg, arm, train[arm]["output_dir"])
        secs[f"eval_{arm}"] = round(secs.get(f"eval_{arm}", 0.0) + time.perf_counter() - t0, 1)  # over reruns
        save()
    from .report import write_report

    report = write_report(out)
    return SftStudyRun(out=out, state=state, report=report, seconds=secs)
