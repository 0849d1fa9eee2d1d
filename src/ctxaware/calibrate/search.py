"""``calibrate()``: choose heads and α for one model on held-in NIH cells, under the quality guard.

Steps: (1) build the held-in NIH prompts (chat template) and score every head by the attention the
last prompt token pays to the needle (:mod:`ctxaware.calibrate.heads`); (2) form the candidates
(every head set × every α, plus the unsteered baseline); (3) run the quality guard on each
(:mod:`ctxaware.calibrate.guard`), cheap, so that only candidates that keep quality are (4)
scored on the held-in cells: first by the mean loss of the needle sentence as the answer (a
continuous score, one forward pass per cell; by default it alone decides, and recall is measured
for the baseline and the winner), or with ``select_by="recall"`` the ``recall_top`` candidates
with the lowest loss and the baseline answer the cells greedily and are ranked by cells with
recall 1, mean recall, then needle loss; (5) keep the best candidate
that beats the baseline, else the baseline (α = 1: "no steering"), and write the steering file,
the search table and the plot (:mod:`ctxaware.calibrate.report`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import load_kwargs
from ..attention.backend import model_dims
from ..niah.haystack import BUILTIN, CORPUS_DIR, Haystack, HaystackText, read_haystack
from ..niah.needles import load_needle
from ..niah.prompts import build_messages, build_prompt
from ..niah.scoring import recall
from ..steering import SteeringConfig, write_steering_file
from .config import BUILTIN_TAIL, CalibrationConfig
from .guard import Guard, instruction_set, qa_set, response_losses
from .heads import count_heads, head_set, heads_to_spec, rank_heads, retrieval_scores
from .search_cache import StepCache, digest

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One steering configuration tried, and what it scored."""

    name: str
    head_set: str
    alpha: float
    heads: Any
    n_heads: int
    rule: str = "alpha"
    share: float | None = None
    guard: dict[str, Any] = field(default_factory=dict)
    recall: float | None = None
    cells_perfect: int | None = None
    needle_loss: float | None = None
    answers: list[str] = field(default_factory=list)
    found: list[int] = field(default_factory=list)  # per held-in cell: 1 when the answer has recall 1

    @property
    def config(self) -> SteeringConfig:
        if self.rule == "share":
            return SteeringConfig(rule="share", share=self.share, heads=heads_to_spec(self.heads))
        return SteeringConfig(alpha=self.alpha, heads=heads_to_spec(self.heads))

    @property
    def steered(self) -> bool:
        return self.rule == "share" or self.alpha < 1

    @property
    def weakness(self) -> float:
        """Larger = gentler steering (alpha, or 1 - share): the tie-break between equal scores."""
        return 1.0 - float(self.share) if self.rule == "share" else self.alpha

    def key(self, select_by: str = "recall") -> tuple:
        """Selection key (larger is better): lower needle loss, or held-in cells with recall 1, then mean
        recall, then lower needle loss."""
        loss = -(self.needle_loss if self.needle_loss is not None else float("inf"))
        if select_by == "needle_loss":
            return (loss,)
        return (self.cells_perfect if self.cells_perfect is not None else -1,
                self.recall if self.recall is not None else -1.0, loss)

    def row(self) -> dict[str, Any]:
        g = self.guard
        out = {"candidate": self.name, "head_set": self.head_set, "rule": self.rule,
               "alpha": self.alpha if self.rule == "alpha" else None, "share": self.share, "n_heads": self.n_heads,
               "guard_passed": g.get("passed"), "heldin_recall": self.recall, "heldin_perfect": self.cells_perfect,
               "heldin_needle_loss": self.needle_loss}
        if self.found:  # per held-in cell, for the paired test of the report
            out["heldin_found"] = list(self.found)
        for name in ("instructions", "qa"):
            if name in g:
                out[f"{name}_loss"] = g[name]["loss"]
                out[f"{name}_rise"] = g[name]["rise"]
        return out


def held_in_haystack(source: str) -> HaystackText:
    """The held-in haystack text; ``builtin-tail`` is the built-in corpus, last essay first."""
    if source != BUILTIN_TAIL:
        return read_haystack(source)
    files = sorted(CORPUS_DIR.glob("*.txt"), reverse=True)
    text = "".join(f.read_text(encoding="utf-8").replace("\n", " ").rstrip() + " " for f in files)
    return HaystackText(BUILTIN + "-tail", text, tuple(str(f) for f in files))


def held_in_cells(cfg: CalibrationConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], str, Any]:
    """The held-in cells: ``[{"length", "depth", "prompt", "messages"}]``, the haystack id and the needle.

    A multi-needle task places all its sentences (:meth:`~ctxaware.niah.haystack.Haystack.place_task`); the
    answer whose loss is scored is its needles in order (not its distractors)."""
    needle = load_needle(cfg.needle)
    hay = Haystack(held_in_haystack(cfg.haystack), tokenizer)
    cells = []
    for length in sorted(set(cfg.lengths)):
        for depth in sorted(set(cfg.depths)):
            placement = hay.place_task(needle, length, depth, reserve=cfg.reserve)
            prompt = build_prompt(tokenizer, placement.text, needle, "chat")
            answer = build_messages(placement.text, needle, "chat") + [{"role": "assistant",
                                                                          "content": " ".join(needle.texts)}]
            cells.append({"length": length, "depth": depth, "prompt": prompt.rendered, "messages": answer})
    return cells, hay.id, needle


def _needle_loss(model: Any, tokenizer: Any, cand: Candidate, cells: list[dict]) -> None:
    """Mean loss of the needle sentence as the answer of each held-in cell, under the candidate's steering."""
    losses = response_losses(model, tokenizer, [c["messages"] for c in cells], cand.config if cand.steered else None)
    cand.needle_loss = sum(losses) / len(losses)


def _steering_key(cand: Candidate) -> Any:
    return cand.config.to_dict() if cand.steered else None


def _cached_needle_loss(cache: StepCache, key: dict, model: Any, tokenizer: Any, cand: Candidate,
                        cells: list[dict]) -> None:
    k = {**key, "steering": _steering_key(cand)}
    value = cache.get("needle_loss", k)
    if value is None:
        _needle_loss(model, tokenizer, cand, cells)
        cache.put("needle_loss", k, cand.needle_loss)
    else:
        cand.needle_loss = float(value)


def _cached_answer(cache: StepCache, key: dict, cfg: CalibrationConfig, model: Any, tokenizer: Any,
                   cand: Candidate, cells: list[dict], needle: Any) -> None:
    k = {**key, "steering": _steering_key(cand), "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}
    value = cache.get("answers", k)
    if value is None:
        _answer(cfg, model, tokenizer, cand, cells, needle)
        cache.put("answers", k, cand.answers)
    else:
        cand.answers = list(value)
        scores = [recall(a, needle.keywords) for a in cand.answers]
        cand.recall = sum(scores) / len(scores)
        cand.cells_perfect = sum(1 for s in scores if s >= 1.0)
        cand.found = [int(s >= 1.0) for s in scores]


def _answer(cfg: CalibrationConfig, model: Any, tokenizer: Any, cand: Candidate, cells: list[dict],
            needle: Any) -> None:
    """Greedy answers (and their recall) of one candidate on the held-in cells."""
    from ..niah.engine import GreedyEngine, Job

    steering = cand.config if cand.steered else None
    engine = GreedyEngine(model, tokenizer, cfg.max_new_tokens, steer_config=steering, batch_size=cfg.batch_size)
    jobs = [Job(c["prompt"], steer=steering is not None, tag=i) for i, c in enumerate(cells)]
    answers: dict[int, str] = {}
    engine.run(jobs, lambda job, text: answers.__setitem__(job.tag, text))
    cand.answers = [answers[i] for i in range(len(cells))]
    scores = [recall(a, needle.keywords) for a in cand.answers]
    cand.recall = sum(scores) / len(scores)
    cand.cells_perfect = sum(1 for s in scores if s >= 1.0)
    cand.found = [int(s >= 1.0) for s in scores]


def recall_shortlist(cands: list[Candidate], top: int) -> list[Candidate]:
    """The ``top`` candidates with the lowest held-in needle loss (all when ``top`` is 0), in search order."""
    if top <= 0 or len(cands) <= top:
        return list(cands)
    keep = sorted(cands, key=lambda c: (c.needle_loss, -c.weakness, c.n_heads))[:top]
    return [c for c in cands if any(c is k for k in keep)]


def candidates(cfg: CalibrationConfig, scores: Any) -> list[Candidate]:
    """The unsteered baseline, then every head set × (every α, then every target share)."""
    n_layers, n_heads = scores.shape
    out = [Candidate("unsteered", "none", 1.0, "all", 0)]
    for name in cfg.head_sets:
        heads = head_set(scores, name)
        for alpha in cfg.alphas:
            out.append(Candidate(f"{name}@{alpha:g}", name, float(alpha), heads, count_heads(heads, n_layers, n_heads)))
        for share in cfg.shares:
            out.append(Candidate(f"{name}@s{share:g}", name, 1.0, heads, count_heads(heads, n_layers, n_heads),
                                 rule="share", share=float(share)))
    return out


def choose(cands: list[Candidate], select_by: str = "recall") -> tuple[Candidate, str]:
    """The best guard-passing candidate that beats the baseline on the held-in key, else the baseline."""
    base = cands[0]
    passing = [c for c in cands[1:] if c.guard.get("passed") and c.needle_loss is not None
               and (select_by == "needle_loss" or c.recall is not None)]
    if not passing:
        return base, "no candidate passed the quality guard: unsteered (alpha = 1)"
    best = max(passing, key=lambda c: (c.key(select_by), c.weakness, -c.n_heads))
    if best.key(select_by) <= base.key(select_by):
        return base, "no guard-passing candidate beat the unsteered model on the held-in cells: alpha = 1"
    what = ("lowest held-in needle loss" if select_by == "needle_loss"
            else "most held-in cells with recall 1 (then mean recall, then needle loss)")
    return best, f"{what} among candidates within the guard margin: {best.name}"


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` and check it is writable before anything slow runs (one-line error otherwise)."""
    import tempfile

    from ..errors import ConfigError

    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check."):
            pass
    except OSError as exc:
        raise ConfigError(f"output directory {str(out)!r} is not writable ({exc.strerror or exc}); "
                          "choose another --out") from None
    return out


def calibrate(config: CalibrationConfig | None = None, *, model: Any = None, tokenizer: Any = None,
              model_name: str | None = None) -> dict[str, Any]:
    """Run one calibration; writes ``config.out``/steering.yaml, search.{csv,json} (+ plot); returns the summary."""
    from tqdm.auto import tqdm

    from .report import plot_search, write_table

    cfg = config or CalibrationConfig()
    t_start = time.perf_counter()
    from ..niah.haystack import check_haystack
    from .guard import instruction_set, qa_set

    load_needle(cfg.needle)  # every file the run names is read and checked before the model loads
    check_haystack(cfg.haystack)
    instruction_set(cfg.instructions, cfg.guard_examples)
    qa_set(cfg.qa or None, cfg.guard_examples)
    out = writable_dir(cfg.out)
    if model is None or tokenizer is None:
        from ..models import load_model

        loaded = load_model(cfg.model, **load_kwargs(cfg))
        model, tokenizer, model_name = loaded.model, loaded.tokenizer, model_name or loaded.name
    model_name = model_name or cfg.model
    n_layers, n_heads = model_dims(model)
    cells, hay_id, needle = held_in_cells(cfg, tokenizer)
    cache = StepCache(out / "cache", enabled=cfg.resume)
    from ..identity import device_class, model_dtype, model_ref, result_identity

    model_key = {"model": model_name, "dims": [n_layers, n_heads], "identity": result_identity(  # content, dtype, device
        "calibrate-step", model=model_ref(cfg.model, model_name, given=True), dtype=model_dtype(model),
        device=device_class(model)).to_dict()}
    cells_key = {**model_key, "cells": digest([[c["length"], c["depth"], c["prompt"].input_ids, c["messages"]]
                                               for c in cells]),
                 "needle": needle.needle if needle.single else needle.to_dict()}
    t0 = time.perf_counter()
    cached_scores = cache.get("head_scores", cells_key)
    if cached_scores is None:
        scores = retrieval_scores(model, [(c["prompt"], needle.texts) for c in cells], progress=cfg.progress)
        cache.put("head_scores", cells_key, [[float(v) for v in row] for row in scores])
    else:
        scores = torch.tensor(cached_scores, dtype=torch.float64)
    score_seconds = time.perf_counter() - t0
    cands = candidates(cfg, scores)
    sets = {"instructions": instruction_set(cfg.instructions, cfg.guard_examples),
            "qa": qa_set(cfg.qa, cfg.guard_examples)}
    guard_key = {**model_key, "sets": digest(sets)}  # losses do not depend on the margin; "passed" is redone
    t0 = time.perf_counter()
    guard = Guard(model, tokenizer, sets, cfg.margin, baselines=cache.get("guard_baselines", guard_key))
    cache.put("guard_baselines", guard_key, guard.baselines())
    for cand in tqdm(cands, desc="guard", unit="candidate", disable=not cfg.progress):
        cand.guard = guard.judge(cache.fetch("guard", {**guard_key, "steering": _steering_key(cand)},
                                             lambda c=cand: guard.check(c.config if c.steered else None)))
    guard_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    todo = [c for c in cands if c.guard.get("passed") or not c.steered]
    for cand in tqdm(todo, desc="held-in needle loss", unit="candidate", disable=not cfg.progress):
        _cached_needle_loss(cache, cells_key, model, tokenizer, cand, cells)
        logger.info("%s: held-in needle loss %.4f", cand.name, cand.needle_loss)
    answer = [cands[0]] + (recall_shortlist(todo[1:], cfg.recall_top) if cfg.select_by == "recall" else [])
    for cand in tqdm(answer, desc="held-in answers", unit="candidate", disable=not cfg.progress):
        _cached_answer(cache, cells_key, cfg, model, tokenizer, cand, cells, needle)
        logger.info("%s: held-in recall %.3f, %d/%d cells perfect", cand.name, cand.recall, cand.cells_perfect,
                    len(cells))
    lost = [i for i, a in enumerate(cands[0].answers) if recall(a, needle.keywords) < 1.0]
    if not lost:
        logger.warning("the unsteered model loses none of the %d held-in cells: the search cannot see a repair "
                       "there (choose longer --lengths or shallower --depths)", len(cells))
    chosen, reason = choose(cands, cfg.select_by)
    if chosen.recall is None:
        _cached_answer(cache, cells_key, cfg, model, tokenizer, chosen, cells, needle)
    niah_seconds = time.perf_counter() - t0
    if cache.hits:
        logger.info("resumed: %d step(s) read from %s, %d computed", cache.hits, cache.directory, cache.misses)
    ranked = rank_heads(scores)
    meta = {
        "model": model_name, "model_spec": cfg.model, "rule": chosen.rule if chosen.steered else "none", "chosen": chosen.name, "reason": reason,
        "select_by": cfg.select_by,
        "recall_top": cfg.recall_top if cfg.select_by == "recall" else None,
        "held_in": {"haystack": hay_id, "needle": needle.name, "lengths": sorted(set(cfg.lengths)),
                    "depths": sorted(set(cfg.depths)), "mode": "chat", "max_new_tokens": cfg.max_new_tokens,
                    "tokens": [len(c["prompt"].input_ids) for c in cells],
                    "lost_by_unsteered": [[cells[i]["length"], cells[i]["depth"]] for i in lost]},
        "head_scores": {"criterion": "attention of the last prompt token on the needle tokens, mean over held-in "
                                     "prompts", "top": [[layer, head, round(float(scores[layer, head]), 5)]
                                                        for layer, head in ranked[:20]]},
        "guard": guard.describe(),
        "search": [c.row() for c in cands],
        "heldin_scores": {"unsteered": cands[0].recall, "chosen": chosen.recall,
                          "unsteered_needle_loss": cands[0].needle_loss, "chosen_needle_loss": chosen.needle_loss},
        "seconds": {"head_scores": round(score_seconds, 1), "guard": round(guard_seconds, 1),
                    "heldin_niah": round(niah_seconds, 1), "total": round(time.perf_counter() - t_start, 1)},
        "resumed_steps": cache.hits,
        "model_dims": {"layers": n_layers, "heads": n_heads},
    }
    steering = chosen.config
    path = write_steering_file(out / "steering.yaml", steering, meta)
    write_table(out, cands, scores)
    files = [path, out / "search.csv", out / "search.json"]
    if cfg.plot:
        from ..errors import MissingDependencyError

        try:
            files.append(plot_search(out / "calibration.png", cands, scores, chosen.name))
        except MissingDependencyError as exc:
            logger.warning("no plot: %s", exc)
    return {"steering": steering, "meta": meta, "candidates": cands, "scores": scores, "files": files}
