"""The data stages of an sft-study: sample, score with the probe, label with ``[IND]``, fix the training order.

Files under ``DIR/data/``: ``input.jsonl`` (the seeded sample), ``scored.jsonl`` (``ctxaware
score``'s output, resumable batch by batch) and ``labelled.jsonl`` (``[IND]`` on the chosen user
turns, rows in the training order both arms read). A labelling rule that labels nothing is refused
with the threshold and the best score seen — before scoring when the rule alone shows it (a
target fraction too small for the number of turns, or a dataset that ``ctxaware score`` already
scored: its scores are used and the probe is not run), else right after scoring, always before training.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import SftStudyConfig

logger = logging.getLogger(__name__)

#: batches per length-sorted group of the training order: small, so that padding is low within a batch
#: and a run of fewer steps than the data still trains on a random sample, not on the longest rows
GROUP_BATCHES = 8


def _assistant_turns(row: dict[str, Any]) -> int:
    from ..scoring import row_messages

    try:
        return sum(m.get("role") == "assistant" and bool(m.get("content")) for m in row_messages(row))
    except InputError:
        return 0


def sample_rows(cfg: SftStudyConfig, seed: int, out: Path) -> dict[str, Any]:
    """Write the (sampled) input rows with an answer to ``out``; returns counts. Refuses a rule that labels nothing."""
    from ..scoring import read_rows, write_rows

    rows = read_rows(cfg.dataset)
    usable = [r for r in rows if _assistant_turns(r)]
    if not usable:
        raise InputError(f"{cfg.dataset}: no conversation with an assistant answer to train on")
    if cfg.max_examples and cfg.max_examples < len(usable):
        picked = sorted(random.Random(seed).sample(range(len(usable)), cfg.max_examples))
        usable = [usable[i] for i in picked]
    turns = sum(_assistant_turns(r) for r in usable)
    f = cfg.fraction
    if f is not None and math.floor(f * turns + 0.5) == 0:
        raise InputError(f"--target-fraction {f:g} labels no turn of {turns} answers (round({f:g} x {turns}) = 0); "
                         "raise the fraction or give more data (--max-examples)")
    scored = all("ctx_scores" in r for r in usable)
    if scored:  # an already scored file (ctxaware score): the rule is checked now and the probe not run
        check_labels(cfg, [r.get("ctx_scores") for r in usable])
    write_rows(usable, out)
    return {"rows_in_file": len(rows), "rows": len(usable), "assistant_turns": turns, "sample_seed": seed,
            "scored": scored}


def score(cfg: SftStudyConfig, source: Path, out: Path) -> dict[str, Any]:
    """Score ``source`` with the probe into ``out`` (resumes a partial run); returns the summary."""
    from ..models import load_model
    from ..scoring import ScoringConfig, score_dataset

    loaded = load_model(cfg.probe, dtype=cfg.dtype, device=cfg.device)
    scfg = ScoringConfig(batch_size=cfg.score_batch_size, max_length=cfg.score_max_length)
    summary = score_dataset(loaded.model, loaded.tokenizer, source, out, scfg, model_name=loaded.name,
                            progress=cfg.progress)
    return {"probe": loaded.name, **summary.to_dict()}


def _scores(lists: list[Any]) -> list[float]:
    return [float(s) for sl in lists for s in (sl or []) if isinstance(s, (int, float)) and not isinstance(s, bool)
            and not math.isnan(s)]


def check_labels(cfg: SftStudyConfig, score_lists: list[Any]):
    """The labels of the rule in force (:class:`~ctxaware.scoring.indicator.Selection`); refuses when none."""
    from ..scoring.indicator import Selection, top_fraction_labels

    seen = _scores(score_lists)
    best = f"{max(seen):.4f}" if seen else "none"
    if cfg.threshold is not None:
        beta = float(cfg.threshold)
        labels = [[isinstance(s, (int, float)) and not isinstance(s, bool) and not math.isnan(s) and s > beta
                   for s in (sl or [])] for sl in score_lists]
        sel = Selection(labels, beta, sum(map(sum, labels)), len(seen))
        rule = f"--threshold {beta:g}"
    else:
        sel = top_fraction_labels(score_lists, cfg.fraction)
        rule = f"--target-fraction {cfg.fraction:g}"
    if sel.labelled == 0:
        raise InputError(f"{cfg.dataset}: no user turn is labelled at {rule} (best score seen {best} over "
                         f"{len(seen)} scored turns); lower the threshold (e.g. below {best}) or use --target-fraction")
    return sel


def _order(rows: list[dict[str, Any]], seed: int, group: int) -> list[int]:
    """Seeded shuffle, then longest first within groups of ``group`` rows (the Trainer's length grouping,
    computed once from the text without ``[IND]`` so that both arms read the same order)."""
    from ..scoring import row_messages

    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    size = {i: sum(len(str(m.get("content", ""))) for m in row_messages(rows[i])) for i in idx}
    return [i for k in range(0, len(idx), group) for i in sorted(idx[k:k + group], key=lambda i: -size[i])]


def label(cfg: SftStudyConfig, scored: Path, out: Path, *, seed: int, batch: int) -> dict[str, Any]:
    """Write ``labelled.jsonl`` (messages with ``[IND]``, in training order); returns the labelling record."""
    from ..scoring import apply_indicator, read_rows, row_messages, write_rows
    from ..scoring.run import SCORE_COLUMNS

    rows = read_rows(scored)
    score_lists = [r.get("ctx_scores") for r in rows]
    sel = check_labels(cfg, score_lists)
    labelled_rows, labelled_rows_n = [], 0
    for row, scores, labels in zip(rows, score_lists, sel.labels):
        messages = apply_indicator(row_messages(row), scores, math.inf, labels=labels) if scores else row_messages(row)
        new = {k: v for k, v in row.items() if k not in SCORE_COLUMNS and k != "conversations"}
        new["messages"] = messages
        labelled_rows.append(new)
        labelled_rows_n += any(labels)
    order = _order(labelled_rows, seed, GROUP_BATCHES * batch)
    write_rows([labelled_rows[i] for i in order], out)
    return {"rule": "threshold" if cfg.threshold is not None else "target-fraction",
            "threshold": sel.beta, "target_fraction": cfg.fraction, "labelled_turns": sel.labelled,
            "scored_turns": sel.scored, "fraction_labelled": sel.fraction, "rows": len(rows),
            "rows_labelled": labelled_rows_n, "best_score": max(_scores(score_lists), default=None),
            "order": f"seeded shuffle (seed {seed}), longest first within groups of {GROUP_BATCHES * batch}"}
