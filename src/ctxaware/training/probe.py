"""The fixed probe set that :class:`~ctxaware.training.callback.ContextAwarenessCallback` runs during training.

:class:`MonitorConfig` describes it: a small NIH grid (needle × lengths × depths) answered in two or
more modes (default ``raw+prefix`` and ``chat+prefix``: the same question without and with the chat
template), and the share of the answer-predicting query's attention on the user turn under the
template and without it (the study's attention by role, on NIH prompts of ``attention_length``).
:class:`ContextProbe` builds the prompts once per tokenizer and measures a model with them; it reuses
the NIH machinery (haystack placement, prompt rendering, :class:`~ctxaware.niah.engine.GreedyEngine`,
keyword recall) and :func:`ctxaware.study.attention.attention_by_role`, so a probe value is exactly
what ``ctxaware niah`` / ``ctxaware study`` would report for those cells on that model.

Metrics (names as logged, all floats):

- ``context/recall/<mode>``: mean keyword recall over the grid's cells in that mode;
- ``context/template_gap``: recall without the template minus recall with it (first ``raw`` mode minus
  the first ``chat`` mode of the same other flags); positive when the template costs context awareness;
- ``context/ind_gain``: recall of ``chat...+ind`` minus the same mode without ``+ind`` (when both run);
- ``context/user_share/template``, ``context/user_share/no_template``: mean over layers of the user
  turn's share of attention; ``context/user_share_gap``: no template minus template;
- ``context/qa/<set>`` (with ``qa``): contains-match accuracy on the first ``qa_limit`` questions of a
  contextual-QA set (``ctxaware eval``'s prompts and metric, chat template), answered greedily.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ..config import ConfigMixin, field
from ..errors import ConfigError
from ..harness.data import DATASETS
from ..niah.config import _number, _split, canonical_mode, parse_mode

logger = logging.getLogger(__name__)

MONITOR_FILE = "context_awareness.jsonl"
PREFIX = "context/"


@dataclass
class MonitorConfig(ConfigMixin):
    """What the training monitor measures, how often, and when it stops training."""

    every: int | None = field(None, metavar="N", help="probe every N optimiser steps (default: eval_steps when the "
                              "trainer evaluates by steps, else save_steps, so probes fall on saved checkpoints)")
    modes: Any = field("raw+prefix,chat+prefix", metavar="M1,M2", help="NIH modes probed (two or more): raw or "
                       "chat, each optionally +prefix and +ind; the template gap is the first raw mode minus the "
                       "first chat mode")
    needle: str = field("SF", metavar="NEEDLE", help="NIH needle of the probe (a built-in name or a file)")
    haystack: str = field("builtin", metavar="SOURCE", help="NIH haystack of the probe")
    lengths: Any = field("500", metavar="L1,L2", help="context lengths of the probe's NIH cells, in tokens")
    depths: Any = field("25,75", metavar="D1,D2", help="needle depths of the probe's NIH cells, in percent")
    max_new_tokens: int = field(16, help="greedy decoding budget per probe answer (the SF needle's answer after "
                                "its prefix is 15 tokens for SmolLM2)")
    reserve: int = field(200, help="tokens of each length kept for template, question and answer (as in niah)")
    batch_size: int = field(8, help="probe cells decoded together")
    attention: bool = field(True, help="measure the user turn's attention share with and without the template")
    attention_length: int = field(500, help="context length of the prompts whose attention is measured")
    attention_depths: Any = field("50", metavar="D1,D2", help="needle depths of those prompts")
    qa: str | None = field(None, metavar="SET", help="also a contextual-QA sample: squad, quac or drop (the first "
                           "qa_limit questions, chat template, contains-match; default: none)")
    qa_limit: int = field(8, help="questions of the QA sample")
    qa_max_new_tokens: int = field(32, help="greedy decoding budget per QA answer")
    data_dir: str | None = field(None, metavar="DIR", help="local QA data folder (see docs/eval.md)")
    at_start: bool = field(True, help="probe once before the first step (the curve's origin, step 0)")
    at_end: bool = field(True, help="probe after the last step when it is not a multiple of every")
    stop_gap: float | None = field(None, metavar="X", help="stop training (saving a checkpoint) when the template "
                                   "gap exceeds X at stop_patience consecutive probes")
    stop_patience: int = field(2, metavar="K", help="consecutive probes over stop_gap that stop training")
    file: str = field(MONITOR_FILE, metavar="NAME", help="JSONL file of the probes, in the trainer's output_dir")

    def __post_init__(self) -> None:
        modes = _split(self.modes, "modes") or []
        modes = list(dict.fromkeys(canonical_mode(m) for m in modes))
        bad = [m for m in modes if "steer" in parse_mode(m)[1]]
        if bad:
            raise ConfigError(f"monitor modes cannot steer, got {', '.join(bad)}")
        if len(modes) < 2:
            raise ConfigError(f"the monitor needs two or more NIH modes (e.g. raw+prefix,chat+prefix), got {self.modes!r}")
        self.modes = modes
        self.lengths = [int(_number(v, "lengths")) for v in (_split(self.lengths, "lengths") or [])]
        self.depths = [_number(v, "depths") for v in (_split(self.depths, "depths") or [])]
        self.attention_depths = [_number(v, "attention_depths") for v in (_split(self.attention_depths,
                                                                                 "attention_depths") or [])]
        if not self.lengths or not self.depths or (self.attention and not self.attention_depths):
            raise ConfigError("the monitor needs at least one length and one depth")
        if min(self.lengths + [self.attention_length]) < 64:
            raise ConfigError("monitor lengths must be at least 64 tokens")
        if any(not 0 <= d <= 100 for d in self.depths + self.attention_depths):
            raise ConfigError("monitor depths are percentages in [0, 100]")
        if self.every is not None and int(self.every) < 1:
            raise ConfigError(f"monitor every must be at least 1 step, got {self.every}")
        if self.qa is not None and self.qa not in DATASETS:
            raise ConfigError(f"monitor qa must be one of {', '.join(DATASETS)}, got {self.qa!r}")
        for name in ("max_new_tokens", "batch_size", "stop_patience", "qa_limit", "qa_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"monitor {name} must be at least 1, got {getattr(self, name)}")
        if self.reserve < 0:
            raise ConfigError(f"monitor reserve must be >= 0, got {self.reserve}")
        if self.stop_gap is not None and not -1.0 <= float(self.stop_gap) <= 1.0:
            raise ConfigError(f"stop_gap is a difference of recalls, in [-1, 1]; got {self.stop_gap}")
        if not self.file or "/" in self.file:
            raise ConfigError(f"monitor file must be a plain file name, got {self.file!r}")

    @property
    def gap_modes(self) -> tuple[str, str] | None:
        """(no-template mode, template mode) of the template gap: the first raw mode and the chat mode with
        the same flags (else the first chat mode); None without a raw or a chat mode."""
        raw = next((m for m in self.modes if parse_mode(m)[0] == "raw"), None)
        if raw is None:
            return None
        twin = canonical_mode("chat" + raw[len("raw"):])
        chat = twin if twin in self.modes else next((m for m in self.modes if parse_mode(m)[0] == "chat"), None)
        return (raw, chat) if chat else None

    def probe_dict(self) -> dict[str, Any]:
        """The settings that change a probe's values (not when it runs, nor how training reacts)."""
        skip = {"every", "at_start", "at_end", "stop_gap", "stop_patience", "file", "data_dir"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}


@dataclass
class _Cell:
    mode: str
    length: int
    depth: float
    job: Any


class ContextProbe:
    """The probe prompts of ``config`` for one tokenizer, built once; :meth:`run` measures a model with them."""

    def __init__(self, config: MonitorConfig, tokenizer: Any) -> None:
        from ..niah.haystack import Haystack
        from ..niah.needles import load_needle

        self.config, self.tokenizer = config, tokenizer
        self.needle = load_needle(config.needle)
        self.haystack = Haystack(config.haystack, tokenizer)
        self._cells: list[_Cell] | None = None
        self._qa: list[tuple[dict[str, Any], Any]] | None = None

    def _build_qa(self) -> list[tuple[dict[str, Any], Any]]:
        from ..chat import render
        from ..harness.qa import make_docs
        from ..niah.engine import Job

        docs = make_docs(self.config.qa, "no_ind", self.config.data_dir)[: self.config.qa_limit]
        return [(d, Job(render(self.tokenizer, [{"role": "user", "content": d["prompt"]}], add_generation_prompt=True),
                        tag=i)) for i, d in enumerate(docs)]

    def _build(self) -> list[_Cell]:
        from ..niah.engine import Job
        from ..niah.prompts import build_prompt

        cells = []
        for length in self.config.lengths:
            for depth in self.config.depths:
                placement = self.haystack.place_task(self.needle, length, depth, reserve=self.config.reserve)
                for mode in self.config.modes:
                    prompt = build_prompt(self.tokenizer, placement.text, self.needle, mode)
                    cells.append(_Cell(mode, length, depth, Job(prompt.rendered, tag=len(cells))))
        return cells

    def run(self, model: Any) -> dict[str, Any]:
        """Answer the grid and measure attention on ``model`` (put in eval mode by the caller, under no_grad).

        Returns ``{"metrics": {name: value}, "cells": [{mode, length, depth, recall, answer}], "seconds": {...}}``.
        """
        from ..niah.engine import GreedyEngine
        from ..niah.scoring import recall

        cfg = self.config
        t0 = time.perf_counter()
        if self._cells is None:
            self._cells = self._build()
        answers: dict[int, str] = {}
        engine = GreedyEngine(model, self.tokenizer, cfg.max_new_tokens, batch_size=cfg.batch_size)
        engine.run([c.job for c in self._cells], lambda job, answer: answers.__setitem__(job.tag, answer))
        t1 = time.perf_counter()
        cells = [{"mode": c.mode, "length": c.length, "depth": c.depth, "answer": answers[c.job.tag],
                  "recall": recall(answers[c.job.tag], self.needle.keywords)} for c in self._cells]
        metrics: dict[str, float] = {}
        per_mode: dict[str, float] = {}
        for mode in cfg.modes:
            vals = [c["recall"] for c in cells if c["mode"] == mode]
            per_mode[mode] = sum(vals) / len(vals)
            metrics[f"{PREFIX}recall/{mode}"] = per_mode[mode]
        pair = cfg.gap_modes
        if pair:
            metrics[f"{PREFIX}template_gap"] = per_mode[pair[0]] - per_mode[pair[1]]
        gains = [per_mode[m] - per_mode[canonical_mode(m.replace("+ind", ""))] for m in cfg.modes
                 if "ind" in parse_mode(m)[1] and canonical_mode(m.replace("+ind", "")) in per_mode]
        if gains:
            metrics[f"{PREFIX}ind_gain"] = gains[0]
        seconds = {"niah": round(t1 - t0, 3)}
        if cfg.attention:
            from ..study.attention import attention_by_role

            att = attention_by_role(model, self.tokenizer, self.haystack, self.needle, cfg.attention_length,
                                    cfg.attention_depths, reserve=cfg.reserve, progress=False)
            shares = {c: d["mean_shares"]["user"] for c, d in att["conditions"].items()}
            metrics[f"{PREFIX}user_share/template"] = shares["template"]
            metrics[f"{PREFIX}user_share/no_template"] = shares["no_template"]
            metrics[f"{PREFIX}user_share_gap"] = shares["no_template"] - shares["template"]
            seconds["attention"] = round(time.perf_counter() - t1, 3)
        out = {"metrics": metrics, "cells": cells, "seconds": seconds}
        if cfg.qa:
            t2 = time.perf_counter()
            out["qa"] = self._run_qa(model)
            metrics[f"{PREFIX}qa/{cfg.qa}"] = sum(q["contains"] for q in out["qa"]) / max(1, len(out["qa"]))
            seconds["qa"] = round(time.perf_counter() - t2, 3)
        return out

    def _run_qa(self, model: Any) -> list[dict[str, Any]]:
        """Greedy answers to the QA sample, each scored by contains-match (as ``ctxaware eval``)."""
        from ..harness.qa import contains
        from ..niah.engine import GreedyEngine

        if self._qa is None:
            self._qa = self._build_qa()
        answers: dict[int, str] = {}
        engine = GreedyEngine(model, self.tokenizer, self.config.qa_max_new_tokens, batch_size=self.config.batch_size)
        engine.run([j for _, j in self._qa], lambda job, answer: answers.__setitem__(job.tag, answer))
        return [{"question": d["question"], "answer": answers[j.tag], "contains": contains(answers[j.tag], d["answers"])}
                for d, j in self._qa]


__all__ = ["MONITOR_FILE", "ContextProbe", "MonitorConfig"]
