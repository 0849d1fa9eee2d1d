"""Contextual QA of a study through the lm-eval integration (:mod:`ctxaware.harness`).

Variants, per dataset: ``chat`` (``ctxaware_<set>_no_ind``, the chat template), ``raw``
(``ctxaware_<set>_no_template``) and, when the study steers, ``chat+steer`` (the chat task
with the study's steering); ``chat+ind`` (``ctxaware_<set>_ind``) on request. Each variant writes
``DIR/qa/<variant>/results.json`` (metric, its standard error and the sample count per task, plus
lm-eval's own ``results``/``n-samples`` blocks) atomically; a rerun skips the variants already done
with the same settings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .attention import read_json, write_json

logger = logging.getLogger(__name__)

VARIANT_TASK = {"chat": "ctxaware_{}_no_ind", "raw": "ctxaware_{}_no_template", "chat+steer": "ctxaware_{}_no_ind",
                "chat+ind": "ctxaware_{}_ind"}


def _slug(variant: str) -> str:
    return variant.replace("+", "_")


def qa_tables(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {"metric", "value", "stderr", "n"}}`` from lm-eval's results dict."""
    out = {}
    n_samples = results.get("n-samples", {}) or {}
    for task, metrics in (results.get("results") or {}).items():
        # a metric is a "<name>,<filter>" key with a "<name>_stderr,<filter>" twin (other keys are bookkeeping)
        keys = [k for k in metrics if "," in k and not k.split(",")[0].endswith("_stderr")
                and isinstance(metrics[k], (int, float))]
        keys.sort(key=lambda k: k.replace(k.split(",")[0], k.split(",")[0] + "_stderr", 1) not in metrics)
        if not keys:
            continue
        key = keys[0]
        name = key.split(",")[0]
        stderr = metrics.get(key.replace(name, name + "_stderr", 1))
        n = (n_samples.get(task) or {}).get("effective")
        out[task] = {"metric": name, "value": float(metrics[key]),
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                     "n": int(n) if n is not None else None}
    return out


def _data_files(data: Any, datasets: Sequence[str]) -> dict[str, str]:
    """Content digests of the QA data files of ``datasets`` (so changed data never reuses old results)."""
    from ..harness.data import find_local_file
    from ..identity import file_digest

    return {d: file_digest(find_local_file(Path(data), d)) for d in datasets} if data else {}


def run_qa(model: Any, tokenizer: Any, model_name: str, datasets: Sequence[str], out: Path, *, limit: int,
           data_dir: str | None, steering: Any = None, progress: bool = True,
           variants: Sequence[str] | None = None, model_ref: str | None = None) -> dict[str, Any]:
    """Evaluate every variant not yet in ``out``; returns ``{variant: results.json content}``.

    ``variants`` (default: ``chat``, ``raw`` and, when steering is given, ``chat+steer``) may also name
    ``chat+ind``: the chat task with ``[IND]`` appended to each question (conditional fine-tuning).
    ``model_ref``: the model as configured (``--model``: an HF id, or a directory hashed by content); results are
    reused only for the same :func:`~ctxaware.identity.result_identity` (steering rule/share included).
    """
    from ..errors import require

    lm_eval = require("lm_eval", "study --qa")
    from ..harness import task_manager
    from ..harness.data import resolve_data_dir
    from ..harness.model import CtxawareLM

    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    data = resolve_data_dir(data_dir)
    if variants is None:
        variants = ["chat", "raw"] + (["chat+steer"] if steering is not None else [])
    done: dict[str, Any] = {}
    tm = None
    from ..identity import device_class, model_dtype, model_ref as ref_of, prompt_digest, result_identity

    ref = ref_of(model_ref, model_name, given=True)

    for variant in variants:
        tasks = [VARIANT_TASK[variant].format(d) for d in datasets]
        steered = steering if variant.endswith("steer") else None
        # the whole result identity: the steering's rule/share/emphasis/compounding, the data's content, dtype, ...
        settings = {"model": model_name, "tasks": tasks, "limit": int(limit),
                    "identity": result_identity(
                        "qa", model=ref, dtype=model_dtype(model), device=device_class(model),
                        steering=steered, template=not variant.startswith("raw"), indicator=variant.endswith("ind"),
                        prompt=prompt_digest(_data_files(data, datasets)),
                        extra={"tasks": tasks, "limit": int(limit)}).to_dict()}
        path = out / _slug(variant) / "results.json"
        old = read_json(path)
        if old and old.get("settings") == settings:
            done[variant] = old
            continue
        tm = tm or task_manager(data_dir=str(data) if data else None, include_defaults=False)
        lm = CtxawareLM(pretrained=model, tokenizer=tokenizer, steering=steered)
        logger.info("QA %s: %s (limit %d)", variant, ", ".join(tasks), limit)
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        record = {"variant": variant, "settings": settings, "tables": qa_tables(res),
                  "results": res.get("results"), "n-samples": res.get("n-samples")}
        write_json(path, record)
        done[variant] = record
    return done
