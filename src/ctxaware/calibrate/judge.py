"""Judging a steering file on held-out data: NIH grid + SQuAD sample, chat vs all-heads α vs the file.

``ctxaware calibrate judge --steering DIR/steering.yaml --out runs/judge`` runs three
conditions on the same model:

* ``chat`` — the chat template, unsteered;
* ``chat+all@A`` — every head steered with α = ``--baseline-alpha`` (the paper-style default, 0.9);
* ``chat+file`` — the steering file's configuration;

on (1) a held-out NIH grid through :func:`ctxaware.niah.run_niah` (resumable results under
``out/niah-*``; by default the built-in haystack and needle ``SF``, lengths 4000/5000/6000 × depths
0/25/50 %, disjoint from the calibration's held-in cells), (2) a seeded SQuAD sample (METHOD §5
prompt, greedy, the answer cut at the first ". ", metric "contains", mean ± standard error), and
(3) the quality guard's losses for each steered condition. Writes ``judge.json`` and ``judge.md``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigMixin, field
from ..errors import ConfigError
from ..fsio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class JudgeConfig(ConfigMixin):
    """Held-out evaluation of one steering file against chat and chat + all heads."""

    steering: str = field("", metavar="FILE", help="steering file to judge (ctxaware calibrate's steering.yaml)")
    model: str = field("", help="model (default: the one named in the steering file's calibration, else embedded)")
    out: str = field("runs/judge", metavar="DIR", help="output directory (NIH results resume from it)")
    haystack: str = field("builtin", metavar="SOURCE", help="held-out NIH haystack")
    needle: str = field("SF", metavar="NEEDLE", help="held-out NIH needle")
    lengths: str = field("4000,5000,6000", metavar="L1,L2,...", help="held-out NIH lengths")
    depths: str = field("0,25,50", metavar="D1,D2,...", help="held-out NIH depths (percent)")
    baseline_alpha: float = field(0.9, help="alpha of the all-heads comparison condition")
    qa: str = field("", metavar="FILE", help="SQuAD file (.jsonl HF rows or original JSON); empty = no QA")
    qa_examples: int = field(20, help="SQuAD questions (seeded sample of passages under 1500 characters)")
    niah: bool = field(True, help="run the held-out NIH grid (--no-niah: SQuAD and guard only)")
    qa_seed: int = field(1, help="seed of the SQuAD sample (the guard uses seed 0: a different sample)")
    drop: str = field("", metavar="FILE", help="DROP file (.jsonl rows or original JSON) for a second QA sample, "
                                               "seeded like SQuAD; empty = no DROP")
    drop_examples: int = field(20, help="DROP questions (seeded sample of passages under 1500 characters)")
    instructions: str = field("", metavar="FILE", help="guard conversations (JSONL); empty = built-in")
    guard_examples: int = field(8, help="examples per guard set")
    max_new_tokens: int = field(40, help="greedy budget per NIH answer")
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self) -> None:
        if not self.steering:
            raise ConfigError("judge needs --steering FILE (the steering.yaml written by ctxaware calibrate)")
        if not 0 < float(self.baseline_alpha) <= 1:
            raise ConfigError(f"baseline_alpha must lie in (0, 1], got {self.baseline_alpha}")
        for name in ("qa_examples", "drop_examples"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def _squad_sample(path: str, n: int, seed: int, dataset: str = "squad") -> list[dict]:
    import random

    from ..harness.data import parse_records

    p = Path(path)
    text = p.read_text(encoding="utf-8")
    doc = [json.loads(x) for x in text.splitlines() if x.strip()] if p.suffix == ".jsonl" else json.loads(text)
    rows = [r for r in parse_records(dataset, doc, str(p)) if len(r["passage"]) <= 1500 and r["answers"]]
    return rows if len(rows) <= n else random.Random(seed).sample(rows, n)


def qa_contains(model: Any, tokenizer: Any, rows: list[dict], steering: Any, *, max_new_tokens: int = 48,
                dataset: str = "squad") -> list[float]:
    """"contains" per question, answers cut at the first ". " (greedy; steered when ``steering`` is active)."""
    from ..chat import render
    from ..harness.qa import build_prompt, contains
    from ..niah.engine import GreedyEngine, Job

    active = steering is not None and steering.active
    engine = GreedyEngine(model, tokenizer, max_new_tokens, steer_config=steering if active else None)
    jobs = [Job(render(tokenizer, [{"role": "user", "content": build_prompt(dataset, r["passage"], r["question"])}],
                       add_generation_prompt=True), steer=active, tag=i) for i, r in enumerate(rows)]
    answers: dict[int, str] = {}
    engine.run(jobs, lambda job, text: answers.__setitem__(job.tag, text))
    return [contains(answers[i].split(". ")[0], r["answers"]) for i, r in enumerate(rows)]


def _qa_and_guard(model: Any, tokenizer: Any, squad: list[dict], guard: Any, steering: Any,
                  drop: list[dict] | None = None) -> dict[str, Any]:
    from .guard import mean_se

    row: dict[str, Any] = {}
    for name, rows in (("squad", squad), ("drop", drop or [])):
        if rows:
            m, se = mean_se(qa_contains(model, tokenizer, rows, steering, dataset=name))
            row.update({f"{name}_contains": m, f"{name}_se": se, f"{name}_n": len(rows)})
    g = guard.check(steering)
    row.update({f"guard_{k}_rise": g[k]["rise"] for k in ("instructions", "qa")}, guard_passed=g["passed"])
    return row


def _cached(out: Path, cfg: JudgeConfig, steering: Any, compute: Any, model: Any = None,
            model_name: str | None = None) -> dict[str, Any]:
    """SQuAD + guard numbers of one condition, kept in ``out/conditions/`` keyed by everything they depend on
    (the result identity: model content, dtype, device class, the whole steering)."""
    import hashlib

    from ..identity import device_class, model_dtype, model_id, result_identity

    key = {"steering": steering.to_dict() if steering is not None and steering.active else None, "qa": cfg.qa,
           "qa_examples": cfg.qa_examples, "qa_seed": cfg.qa_seed, "instructions": cfg.instructions,
           "guard_examples": cfg.guard_examples, "model": cfg.model}
    if model is not None:
        key["identity"] = result_identity(
            "calibrate-judge", model=model_id(model_name), dtype=model_dtype(model), device=device_class(model),
            steering=steering if steering is not None and steering.active else None).to_dict()
    if cfg.drop:  # (keys without DROP stay those of earlier runs)
        key.update(drop=cfg.drop, drop_examples=cfg.drop_examples)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = out / "conditions" / f"{digest}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["row"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            logger.warning("%s: unreadable cached condition, recomputing it", path)
    row = compute()
    atomic_write_json(path, {"key": key, "row": row})  # temp file + fsync + rename: a kill never leaves half a row
    return row


def judge(cfg: JudgeConfig) -> dict[str, Any]:
    """Run the three conditions; returns (and writes) the table as data."""
    from ..models import load_model
    from ..niah import NiahConfig, run_niah
    from ..steering import SteeringConfig, read_steering_file
    from .guard import Guard, instruction_set, qa_set

    file_cfg, meta = read_steering_file(cfg.steering)
    model_name = cfg.model or meta.get("model_spec") or meta.get("model") or "embedded"
    loaded = load_model(None if model_name == "embedded" else model_name, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    conditions = {"chat": None, f"chat+all@{cfg.baseline_alpha:g}": SteeringConfig(alpha=cfg.baseline_alpha),
                  "chat+file": file_cfg}
    common = dict(model=model_name, haystack=cfg.haystack, needle=cfg.needle, lengths=cfg.lengths, depths=cfg.depths,
                  max_new_tokens=cfg.max_new_tokens, progress=cfg.progress, dtype="float32")
    recs: list[dict[str, Any]] = []
    if cfg.niah:
        recs = run_niah(NiahConfig(modes="chat,chat+steer", alpha=cfg.baseline_alpha, heads="all",
                                   out=str(out / "niah-all"), **common), model=model, tokenizer=tok,
                        model_name=model_name, plot=False).records
    file_run = None
    if file_cfg.active and cfg.niah:
        if "steering" in NiahConfig.field_names():
            steer_opts: dict[str, Any] = {"steering": str(cfg.steering)}
        elif file_cfg.rule == "alpha":
            steer_opts = {"alpha": file_cfg.alpha, "heads": file_cfg.heads}
        else:
            raise ConfigError(f"{cfg.steering}: rule {file_cfg.rule!r} needs a niah that reads steering files")
        file_run = run_niah(NiahConfig(modes="chat+steer", out=str(out / "niah-file"), **steer_opts, **common),
                            model=model, tokenizer=tok, model_name=model_name, plot=False)
    niah = {"chat": [r for r in recs if r["mode"] == "chat"],
            f"chat+all@{cfg.baseline_alpha:g}": [r for r in recs if r["mode"] == "chat+steer"],
            "chat+file": file_run.records if file_run else [r for r in recs if r["mode"] == "chat"]}
    guard = Guard(model, tok, {"instructions": instruction_set(cfg.instructions, cfg.guard_examples),
                               "qa": qa_set(cfg.qa or None, cfg.guard_examples)}, margin=float(
                                   (meta.get("guard") or {}).get("margin_nats", 0.05)))
    squad = _squad_sample(cfg.qa, cfg.qa_examples, cfg.qa_seed) if cfg.qa else []
    drop = _squad_sample(cfg.drop, cfg.drop_examples, cfg.qa_seed, "drop") if cfg.drop else []
    table = {}
    lost = {(r["length"], r["depth"]) for r in niah["chat"] if r["recall"] < 1.0}
    for name, steering in conditions.items():
        cells = niah[name]
        row = {"niah_cells": len(cells), "niah_perfect": sum(r["recall"] >= 1.0 for r in cells),
               "niah_mean_recall": sum(r["recall"] for r in cells) / max(1, len(cells)),
               "recovered_of_lost": sum(1 for r in cells if (r["length"], r["depth"]) in lost and r["recall"] >= 1.0),
               "lost_by_chat": len(lost)}
        row.update(_cached(out, cfg, steering, lambda st=steering: _qa_and_guard(model, tok, squad, guard, st, drop),
                           model, model_name))
        table[name] = row
    result = {"steering_file": str(cfg.steering), "file_config": file_cfg.to_dict(), "model": model_name,
              "held_out": {"haystack": cfg.haystack, "needle": cfg.needle, "lengths": cfg.lengths,
                           "depths": cfg.depths}, "guard": guard.describe(), "table": table}
    atomic_write_json(out / "judge.json", result)
    lines = ["| condition | NIH cells with recall 1 | lost cells recovered | mean recall | SQuAD contains (± SE) "
             "| DROP contains (± SE) | guard: instr. loss rise | guard: QA loss rise |", "|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        qa_txt, drop_txt = (f"{r[f'{d}_contains']:.3f} ± {r[f'{d}_se']:.3f} (n={r[f'{d}_n']})"
                            if f"{d}_contains" in r else "-" for d in ("squad", "drop"))
        lines.append(f"| {name} | {r['niah_perfect']}/{r['niah_cells']} | {r['recovered_of_lost']}/{r['lost_by_chat']} "
                     f"| {r['niah_mean_recall']:.3f} | {qa_txt} | {drop_txt} | {r['guard_instructions_rise']:+.4f} "
                     f"| {r['guard_qa_rise']:+.4f} |")
    atomic_write_text(out / "judge.md", "\n".join(lines) + "\n")
    result["markdown"] = "\n".join(lines)
    return result
