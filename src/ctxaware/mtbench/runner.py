"""Running MT-Bench: generate both turns of every question, judge each turn, summarise — resumably.

Layout of ``DIR`` (``MtBenchConfig.out``)::

    answers.jsonl     one line per (model, condition, question): question_id, category, turns (the two answers)
    judgments.jsonl   one line per (model, condition, question, turn, judge): score (null = unjudged), judge_reply
    summary.json      this run's scores (mean over judged turns, per turn, per category, counts) and, under
                      "all", the same for every (model, condition, judge) found in the files

Both JSONL files are appended with an fsync per record (:class:`~ctxaware.fsio.JsonlAppender`, which
also cuts a line torn by a kill), so a rerun generates only the missing answers and judges only the
missing turns. Summaries are pure functions of the two files (:func:`summarize`, :func:`read_mtbench`).
Generation goes through :class:`~ctxaware.steering.SteeredModel` (greedy; steered when asked), or with
``engine="vllm"`` through :class:`~ctxaware.vllm.generate.VllmEngine` on the same rendered prompts.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import ConfigError, InputFileNotFoundError
from ..fsio import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_jsonl
from .config import MtBenchConfig, condition_name
from .data import Question, judge_messages, load_data, select
from .judge import JudgeClient

logger = logging.getLogger(__name__)
ANSWERS, JUDGMENTS, SUMMARY = "answers.jsonl", "judgments.jsonl", "summary.json"


@dataclass
class MtBenchRun:
    """What :func:`run_mtbench` returns: the directory, its summary and the records of this run's group."""

    out: Path
    summary: dict[str, Any]
    answers: list[dict[str, Any]] = field(default_factory=list)
    judgments: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def answer_key(rec: dict[str, Any]) -> tuple:
    return rec["model"], rec["condition"], str(rec["question_id"])


def judgment_key(rec: dict[str, Any]) -> tuple:
    return rec["model"], rec["condition"], str(rec["question_id"]), int(rec["turn"]), rec["judge"], rec.get("judge_url")


def _group(j: dict[str, Any]) -> tuple:
    """A summary row: one (model, condition, judge model, judge endpoint)."""
    return j["model"], j["condition"], j["judge"], j.get("judge_url")


def answer_identity(cfg: MtBenchConfig, model: Any, model_name: str | None, dtype: str, device: str) -> Any:
    """The :class:`~ctxaware.identity.Identity` of this run's answers: model (and adapter) by content, dtype,
    device class, engine, template, steering, [IND], decoding budget and label."""
    from ..identity import model_id, model_ref, result_identity
    from ..models import _adapter_base

    adapter = model_id(cfg.adapter) if cfg.adapter else None
    base = model_id(_adapter_base(Path(cfg.adapter)) or cfg.model) if cfg.adapter else \
        model_ref(cfg.model, model_name, given=model is not None)
    cond = cfg.condition()
    steer = cfg.steering_config()
    return result_identity("mtbench-answer", model=base, adapter=adapter, dtype=dtype, device=device,
                           engine=cfg.engine, template=cond["template"] != "none" and cond["template"],
                           steering=steer if steer is not None and steer.active else None, indicator=cfg.indicator,
                           max_new_tokens=cfg.max_new_tokens, extra={"label": cfg.label})


def _resolved(cfg: MtBenchConfig, model: Any) -> tuple[str, str]:
    """``(dtype, device class)`` of the run, before loading (or of the model given)."""
    from ..identity import device_class, model_dtype, resolve_dtype

    if model is not None:
        return model_dtype(model), device_class(model)
    from ..models import default_device

    device = cfg.device or default_device()
    return resolve_dtype(cfg.dtype, device), device_class(device)


def _prompt_hash(q: Question) -> str:
    return hashlib.sha256("\x00".join(q.turns).encode("utf-8")).hexdigest()[:12]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(answers: Iterable[dict[str, Any]], judgments: Iterable[dict[str, Any]], *, model: str,
              condition: str, judge: str, judge_url: str | None = None) -> dict[str, Any]:
    """Scores of one (model, condition, judge) from the records: ``score`` (mean over judged turns, None
    when none is), ``turns`` {"1", "2"}, ``categories`` (mean over both turns), ``judged``/``unjudged``."""
    answers = [a for a in answers if a["model"] == model and a["condition"] == condition]
    cats = {str(a["question_id"]): a["category"] for a in answers}
    rows = [j for j in judgments if j["model"] == model and j["condition"] == condition and j["judge"] == judge
            and j.get("judge_url") == judge_url]
    scored = [j for j in rows if j.get("score") is not None]
    by_cat: dict[str, list[float]] = {c: [] for c in dict.fromkeys(cats.values())}
    for j in scored:
        by_cat.setdefault(cats.get(str(j["question_id"]), j.get("category", "?")), []).append(float(j["score"]))
    info = next((a.get("condition_info") for a in answers if a.get("condition_info")), None)
    return {"model": model, "condition": condition, "condition_info": info, "judge": judge, "judge_url": judge_url,
            "score": _mean([float(j["score"]) for j in scored]),
            "turns": {t: _mean([float(j["score"]) for j in scored if str(j["turn"]) == t]) for t in ("1", "2")},
            "categories": {c: _mean(v) for c, v in by_cat.items()},
            "judged": len(scored), "unjudged": len(rows) - len(scored), "questions": len(answers)}


def _read(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, repair=True) if path.is_file() else []


def read_mtbench(directory: str | Path) -> dict[str, Any]:
    """Every (model, condition, judge) of an MT-Bench directory, summarised from its JSONL files:
    ``{"dir", "runs": [summary, ...], "summary": summary.json or None}``."""
    d = Path(directory)
    if not (d / ANSWERS).is_file():
        raise InputFileNotFoundError(f"{d} is not an MT-Bench directory (no {ANSWERS}); run ctxaware mtbench --out {d}")
    answers = read_jsonl(d / ANSWERS)
    judgments = read_jsonl(d / JUDGMENTS) if (d / JUDGMENTS).is_file() else []
    groups = dict.fromkeys(_group(j) for j in judgments)
    runs = [summarize(answers, judgments, model=m, condition=c, judge=jm, judge_url=ju) for m, c, jm, ju in groups]
    summary = None
    if (d / SUMMARY).is_file():
        import json

        try:
            summary = json.loads((d / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = None
    return {"dir": str(d), "runs": runs, "summary": summary}


def _model_name(cfg: MtBenchConfig, model: Any, model_name: str | None) -> str:
    from ..models import DEFAULT_MODEL, EMBEDDED_NAME, _adapter_base

    if model_name:
        return model_name
    if cfg.adapter and model is None:
        return _adapter_base(Path(cfg.adapter)) or cfg.model
    return EMBEDDED_NAME if cfg.model in (None, DEFAULT_MODEL) else str(cfg.model)


def _check_answers(existing: dict[tuple, dict], questions: Sequence[Question], cfg: MtBenchConfig, name: str,
                   cond: str, out: Path, identity: Any = None) -> None:
    for q in questions:
        a = existing.get((name, cond, str(q.question_id)))
        if a is None:
            continue
        if a.get("prompt_sha") != _prompt_hash(q):
            raise ConfigError(f"{out / ANSWERS} answers question {q.question_id} with other turns than "
                              f"{a.get('data', 'the questions file')}; use another --out for other questions")
        if a.get("max_new_tokens") != cfg.max_new_tokens:
            raise ConfigError(f"{out / ANSWERS} holds answers of {name} ({cond}) generated with max_new_tokens="
                              f"{a.get('max_new_tokens')}; pass --max-new-tokens {a.get('max_new_tokens')} or "
                              "use another --out")
        if identity is not None:  # same names, another model content, device, steering, ...: one line, never reused
            identity.require_same(a.get("identity"), f"{out / ANSWERS} ({name}, {cond})",
                                  fix="use another --out (or delete its answers.jsonl)")


def _generate(cfg: MtBenchConfig, questions: list[Question], model: Any, tokenizer: Any, name: str,
              cond: dict[str, Any], source: str, path: Path, identity: Any = None) -> list[dict[str, Any]]:
    """Answer both turns of ``questions`` in batches, appending each batch's records (one fsync)."""
    from tqdm.auto import tqdm

    from ..scoring.indicator import INDICATOR
    from ..steering import SteeredModel

    steer = cfg.steering_config()
    steered = SteeredModel(model, tokenizer, steer, chat_template=cfg.template_text())
    engine = None
    if cfg.engine != "transformers":  # the same rendered prompts, answered by vLLM (steered through its plugin)
        from ..engines import make_engine

        engine = make_engine(cfg, model, tokenizer, cfg.max_new_tokens, steer_config=steer, batch_size=cfg.batch_size)

    def ask(text: str) -> str:
        return text + " " + INDICATOR if cfg.indicator else text

    def reply(convs: list[list[dict[str, str]]]) -> list[str]:
        from ..measure.plain import render_plain

        if engine is not None:
            from ..vllm.generate import generate_rendered

            rendered = [steered.render(c) if cfg.template else render_plain(tokenizer, c) for c in convs]
            return generate_rendered(engine, rendered, steer=steered.steering_active)
        if not cfg.template:
            return steered.generate_rendered([render_plain(tokenizer, c) for c in convs],
                                             max_new_tokens=cfg.max_new_tokens)
        return steered.chat_batch(convs, max_new_tokens=cfg.max_new_tokens)

    records = []
    cname = condition_name(cond)
    with JsonlAppender(path) as app, tqdm(total=len(questions), desc="MT-Bench answers", unit="question",
                                          disable=not cfg.progress) as bar:
        for i in range(0, len(questions), cfg.batch_size):
            batch = questions[i:i + cfg.batch_size]
            t0 = time.perf_counter()
            convs = [[{"role": "user", "content": ask(q.turns[0])}] for q in batch]
            first = reply(convs)
            convs = [c + [{"role": "assistant", "content": a}, {"role": "user", "content": ask(q.turns[1])}]
                     for c, a, q in zip(convs, first, batch)]
            second = reply(convs)
            seconds = (time.perf_counter() - t0) / len(batch)
            recs = [{"question_id": q.question_id, "category": q.category, "turns": [a1, a2], "model": name,
                     "condition": cname, "condition_info": cond, "max_new_tokens": cfg.max_new_tokens,
                     "prompt_sha": _prompt_hash(q), "data": source, "seconds": round(seconds, 3),
                     **({"identity": identity.to_dict()} if identity is not None else {})}
                    for q, a1, a2 in zip(batch, first, second)]
            app.write_many(recs)
            records += recs
            bar.update(len(batch))
    return records


def _judge(cfg: MtBenchConfig, client: JudgeClient, tasks: list[tuple[Question, dict[str, Any], int]],
           prompts: dict[str, dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Judge ``tasks`` (question, answer record, turn) concurrently; each verdict is appended as it arrives.
    On an error or interrupt, calls not yet started are cancelled and those in flight are still recorded."""
    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []

    def record(q: Question, a: dict[str, Any], turn: int, prompt: str, v: Any) -> dict[str, Any]:
        return {"question_id": q.question_id, "category": q.category, "turn": turn, "score": v.score,
                "judge_reply": v.reply, "model": a["model"], "condition": a["condition"], "judge": client.model,
                "judge_url": client.base_url,
                "judge_prompt": prompt, "tries": v.tries, "error": v.error}

    with JsonlAppender(path) as app, tqdm(total=len(tasks), desc="MT-Bench judging", unit="turn",
                                          disable=not cfg.progress) as bar, \
            cf.ThreadPoolExecutor(max_workers=cfg.judge_concurrency, thread_name_prefix="mtbench-judge") as pool:
        futures = {}
        for q, a, turn in tasks:
            prompt, messages = judge_messages(q, a["turns"], turn, prompts)
            futures[pool.submit(client.judge, messages)] = (q, a, turn, prompt)
        done: set = set()

        def take(fut: cf.Future) -> None:
            rec = record(*futures[fut], fut.result())
            app.write(rec)
            records.append(rec)
            done.add(fut)
            bar.update(1)

        try:
            for fut in cf.as_completed(futures):
                take(fut)
        except BaseException:
            for fut in futures:
                fut.cancel()
            for fut in futures:
                if fut not in done and not fut.cancelled():
                    try:
                        take(fut)
                    except Exception:  # noqa: BLE001 - the first error is the one raised
                        pass
            raise
    return records


def judge_client(cfg: MtBenchConfig) -> JudgeClient:
    """The judge client of ``cfg`` (API key from ``$judge_api_key_env``, when set)."""
    cfg.require_judge()
    return JudgeClient(cfg.judge_base_url, cfg.judge_model, api_key=os.environ.get(cfg.judge_api_key_env) or None,  # type: ignore[arg-type]
                       retries=cfg.judge_retries, timeout=cfg.judge_timeout, backoff=cfg.judge_backoff,
                       max_tokens=cfg.judge_max_tokens or None, concurrency=cfg.judge_concurrency)


def check_judge(cfg: MtBenchConfig) -> str:
    """Fail now when the judge of ``cfg`` is unreachable or refuses the key; returns the judge model."""
    with judge_client(cfg) as client:
        return client.check()


def run_mtbench(config: MtBenchConfig | None = None, *, model: Any = None, tokenizer: Any = None,
                model_name: str | None = None) -> MtBenchRun:
    """Run (or resume) MT-Bench for ``config``; ``model``/``tokenizer`` reuse a loaded model (then
    ``model_name`` names it in the records, default ``config.model``)."""
    cfg = config or MtBenchConfig()
    cfg.require_judge()
    if model is not None and cfg.adapter:
        raise ConfigError("pass a loaded model or an adapter directory, not both")
    data = load_data(cfg.data_dir, cfg.questions)
    questions = select(data.questions, cfg.limit)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype, device = _resolved(cfg, model)
    cond = {**cfg.condition(), "dtype": dtype}
    cname = condition_name(cond)
    name = _model_name(cfg, model, model_name)
    identity = answer_identity(cfg, model, model_name, dtype, device)
    seconds: dict[str, float] = {}
    from ..fsio import DirLock

    # one process at a time per directory: a second one (another terminal, a retried job) is refused in one line
    with DirLock(out, "mtbench"), judge_client(cfg) as client:
        judge_model = client.check()  # before loading or generating anything
        existing = {answer_key(a): a for a in _read(out / ANSWERS)}
        _check_answers(existing, questions, cfg, name, cname, out, identity)
        missing = [q for q in questions if (name, cname, str(q.question_id)) not in existing]
        if missing:
            t0 = time.perf_counter()
            if model is None or tokenizer is None:
                from ..engines import load_for_engine

                loaded = load_for_engine(cfg, cfg.adapter or cfg.model)  # vLLM: tokenizer and config only
                model, tokenizer = loaded.model, loaded.tokenizer
            for a in _generate(cfg, missing, model, tokenizer, name, cond, data.source, out / ANSWERS, identity):
                existing[answer_key(a)] = a
            seconds["generate"] = time.perf_counter() - t0

        judgments = _read(out / JUDGMENTS)
        if cfg.rejudge_unjudged and any(j.get("score") is None for j in judgments):
            mine = {(name, cname, judge_model, client.base_url)}
            judgments = [j for j in judgments if j.get("score") is not None or _group(j) not in mine]
            atomic_write_jsonl(out / JUDGMENTS, judgments)
        have = {judgment_key(j) for j in judgments}
        tasks = [(q, existing[(name, cname, str(q.question_id))], turn) for q in questions for turn in (1, 2)
                 if (name, cname, str(q.question_id), turn, judge_model, client.base_url) not in have]
        if tasks:
            t0 = time.perf_counter()
            judgments += _judge(cfg, client, tasks, data.prompts, out / JUDGMENTS)
            seconds["judge"] = time.perf_counter() - t0
            logger.info("%d judge requests for %d turns", client.requests, len(tasks))
    answers = list(existing.values())
    summary = summarize(answers, judgments, model=name, condition=cname, judge=judge_model, judge_url=client.base_url)
    groups = dict.fromkeys(_group(j) for j in judgments)
    summary["all"] = [summarize(answers, judgments, model=m, condition=c, judge=jm, judge_url=ju)
                      for m, c, jm, ju in groups]
    summary["data"] = data.source
    atomic_write_json(out / SUMMARY, summary)
    mine_a = [a for a in answers if a["model"] == name and a["condition"] == cname]
    mine_j = [j for j in judgments if _group(j) == (name, cname, judge_model, client.base_url)]
    return MtBenchRun(out=out, summary=summary, answers=mine_a, judgments=mine_j, seconds=seconds)


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of one summary: overall, per turn and per category."""
    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.2f}"

    lines = [f"MT-Bench · {summary['model']} · {summary['condition']} · judge {summary['judge']}",
             f"score {f(summary['score'])}  (turn 1 {f(summary['turns']['1'])}, turn 2 {f(summary['turns']['2'])}; "
             f"{summary['judged']} turns judged, {summary['unjudged']} unjudged)"]
    cats = summary.get("categories") or {}
    if cats:
        width = max(len(c) for c in cats)
        lines += [f"  {c:<{width}}  {f(v)}" for c, v in cats.items()]
    if summary["unjudged"]:
        lines.append("unjudged turns stay null (not 0); rerun with --rejudge-unjudged to try them again")
    return "\n".join(lines)


__all__ = ["ANSWERS", "JUDGMENTS", "SUMMARY", "MtBenchRun", "check_judge", "format_summary", "judge_client",
           "read_mtbench", "run_mtbench", "summarize"]
