"""Running multi-document QA: plan (question × k × position × phrasing × mode) → prompts → greedy answers → JSONL.

Results go to ``DIR/results.jsonl`` through NIH's :class:`~ctxaware.niah.results.ResultStore` (appended,
fsynced, resumable by key, shard files merged by a run without ``--shard``) and are answered by NIH's
:class:`~ctxaware.niah.engine.GreedyEngine`, whose batches are planned from the whole plan: a shard takes
whole batches (``--shard i/n``: batches ``i, i + n, ...``), as NIH cells do. Each record's key ends with the digest of its
:func:`ctxaware.identity.result_identity` (model content, dtype, device class, template, steering,
indicator, decoding, batch settings, the prompt's digest and the item's mode/k/position/phrasing).
A record holds the answer, its scores (SQuAD exact match and F1, "contains", on the short answer:
:func:`~ctxaware.multidoc.prompts.short_answer`) and whether the token budget cut it (``truncated``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_kwargs
from .config import MultidocConfig, parse_mode
from .prompts import PREFIX, Question, build_user, distractors, load_questions, paragraphs, render_prompt, select
from .prompts import short_answer

logger = logging.getLogger(__name__)


@dataclass
class Item:
    """One prompt of the plan."""

    question: Question
    k: int
    position: int
    phrasing: int
    mode: str
    others: list[tuple[str, str]]
    key: str = ""
    built: Any = None
    rendered: Any = None


@dataclass
class MultidocRun:
    """What :func:`run_multidoc` returns."""

    out: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    plots: list[Path] = field(default_factory=list)
    new: int = 0


def _steering(cfg: MultidocConfig) -> Any:
    if not cfg.steered:
        return None
    if cfg.steering:
        from ..steering.file import load_steering_file

        return load_steering_file(cfg.steering)
    from ..steering import SteeringConfig

    return SteeringConfig(alpha=float(cfg.alpha), heads=cfg.heads)


def plan(cfg: MultidocConfig, questions: list[Question]) -> list[Item]:
    """Every item, question-major (then k, position, phrasing, mode)."""
    pool = paragraphs(questions)
    chosen = select(questions, cfg.questions)
    if len(chosen) < cfg.questions:
        logger.warning("only %d questions in the data (asked for %d)", len(chosen), cfg.questions)
    items = []
    for q in chosen:
        most = distractors(q, pool, max(cfg.k), cfg.seed)
        for k in cfg.k:
            for pos in cfg.positions_for(k):
                for ph in cfg.phrasings:
                    for mode in cfg.modes:
                        items.append(Item(q, k, pos, ph, mode, most[:k]))
    return items


def _identity(cfg: MultidocConfig, model: Any, model_ref: str, steer: Any, item: Item | None, prompt: str = "") -> Any:
    from ..identity import device_class, model_dtype, prompt_digest, result_identity

    batch = {"batch_size": cfg.batch_size}
    if item is None:  # the directory: what makes one key mean one thing
        return result_identity("multidoc", model=model_ref, dtype=model_dtype(model), device=device_class(model),
                               max_new_tokens=cfg.max_new_tokens, batch=batch,
                               extra={"seed": cfg.seed, "max_words": cfg.max_words})
    base, flags = parse_mode(item.mode)
    return result_identity("multidoc", model=model_ref, dtype=model_dtype(model), device=device_class(model),
                           template=base == "chat", steering=steer if flags & {"steer", "steer-docs"} else None,
                           indicator="ind" in flags, max_new_tokens=cfg.max_new_tokens, batch=batch,
                           prompt=prompt_digest(prompt),
                           extra={"mode": item.mode, "k": item.k, "position": item.position,
                                  "phrasing": item.phrasing, "question": item.question.id, "seed": cfg.seed,
                                  "max_words": cfg.max_words})


def _record(item: Item, model_name: str, answer: str, job: Any, steer_tag: dict[str, Any]) -> dict[str, Any]:
    from ..harness.qa import contains, exact_match, f1

    short = short_answer(answer)
    gold = list(item.question.answers)
    rec = {"key": item.key, "model": model_name, "mode": item.mode, "question_id": item.question.id,
           "title": item.question.title, "k": item.k, "position": item.position, "phrasing": item.phrasing,
           "tokens": item.rendered.prompt_len,
           "prompt_sha256": hashlib.sha256(item.rendered.text.encode("utf-8")).hexdigest(),
           "answer": answer, "short_answer": short, "gold": gold, "exact_match": exact_match(short, gold),
           "f1": f1(short, gold), "contains": contains(short, gold), "truncated": bool(job.truncated),
           "answer_tokens": job.new_tokens}
    if "prefix" in parse_mode(item.mode)[1]:
        rec["prefix"] = PREFIX
    if parse_mode(item.mode)[1] & {"steer", "steer-docs"}:
        rec.update(steer_tag)
    return rec


def run_multidoc(config: MultidocConfig | None = None, *, model: Any = None, tokenizer: Any = None,
                 model_name: str | None = None) -> MultidocRun:
    """Run (or resume) the multi-document QA of ``config``; returns all records and the summary."""
    from tqdm.auto import tqdm

    from ..distributed import parse_shard
    from ..identity import model_id
    from ..niah.engine import GreedyEngine, Job
    from ..niah.results import ResultStore
    from .summary import summarize, write_summary

    cfg = config or MultidocConfig()
    questions = load_questions(cfg.data)
    items = plan(cfg, questions)  # data problems (too few distractors) before the model loads
    steer = _steering(cfg)
    model_ref = None
    if model is None or tokenizer is None:
        from ..models import load_model

        loaded = load_model(cfg.model, **load_kwargs(cfg))
        model, tokenizer, model_name = loaded.model, loaded.tokenizer, model_name or loaded.name
        model_ref = model_id(cfg.model)  # by content, as every cached result
    model_name = model_name or cfg.model
    model_ref = model_ref or model_name  # a model passed in: its name stands for it
    if steer is not None:
        from ..attention.backend import model_dims

        steer.resolve_heads(*model_dims(model))
    steer_tag = {"alpha": float(steer.alpha), "heads": steer.heads if isinstance(steer.heads, str) else str(steer.heads)} \
        if steer is not None else {}
    shard = parse_shard(cfg.shard)
    store = ResultStore(cfg.out, _identity(cfg, model, model_ref, steer, None).to_dict(), overwrite=cfg.overwrite,
                        config={k: v for k, v in cfg.to_dict().items() if k != "shard"}, shard=shard)
    try:
        for it in items:
            _, flags = parse_mode(it.mode)
            it.built = build_user(it.question, it.others, it.position, it.phrasing, indicator="ind" in flags,
                                  max_words=cfg.max_words)
            prompt = it.built.user + ("\n" + PREFIX if "prefix" in flags else "")
            ident = _identity(cfg, model, model_ref, steer, it, prompt)
            it.key = (f"{model_name}|{it.mode}|{it.question.id}|k={it.k}|p={it.position}|ph={it.phrasing}"
                      f"|id={ident.digest}")
        for it in items:
            it.rendered = render_prompt(tokenizer, it.built, it.mode)
        engine = GreedyEngine(model, tokenizer, cfg.max_new_tokens, steer_config=steer, batch_size=cfg.batch_size)
        # the decoding batches of the WHOLE plan, as NIH's: a shard takes whole batches and a resumed run decodes
        # unfinished batches whole, so an answer never depends on how the work was split (bf16 included)
        batches = engine.plan([Job(it.rendered, steer=bool(parse_mode(it.mode)[1] & {"steer", "steer-docs"}), tag=it)
                               for it in items])[shard[0]::shard[1]]
        mine = [j.tag for b in batches for j in b]
        todo = [it for it in mine if it.key not in store.done]
        logger.info("%d of %d prompts to answer in %s", len(todo), len(mine), store.dir)
        bar = tqdm(total=len(todo), desc="multidoc", unit="prompt", disable=not cfg.progress or not todo)

        def done(job: Any, answer: str) -> None:
            if job.tag.key in store.done:  # answered before, decoded again only to keep its batch whole
                return
            store.append([_record(job.tag, model_name, answer, job, steer_tag)], seconds={job.tag.key: job.seconds})
            bar.update(1)

        try:
            engine.run_batches([b for b in batches if any(j.tag.key not in store.done for j in b)], done)
        finally:
            bar.close()
        store.finalize([it.key for it in (mine if store.sharded else items)])  # plan order, however it was split
        records = [store.done[it.key] for it in (mine if store.sharded else items) if it.key in store.done]
    finally:
        getattr(store, "close", lambda: None)()  # the directory lock, where the store holds one
    if store.sharded:
        return MultidocRun(out=store.dir, records=records, summary=summarize(records), new=len(todo))
    from ..niah.results import write_plan

    write_plan(store.dir, [it.key for it in items])  # the report shows this run's answers, not older plans'
    summary = write_summary(store.dir, records)
    plots: list[Path] = []
    if cfg.plot and records:
        from ..errors import MissingDependencyError

        try:
            from .plot import plot_positions

            plots = [plot_positions(store.dir, records)]
        except MissingDependencyError as exc:
            logger.warning("no chart: %s", exc)
    return MultidocRun(out=store.dir, records=records, summary=summary, plots=plots, new=len(todo))
