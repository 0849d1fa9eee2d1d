"""The quality guard: mean token loss of reference answers, steered vs unsteered (METHOD "Calibration rules").

Two guard sets, each a list of chat conversations whose *first assistant response* is the
reference: instruction conversations (assistant responses of instruction data) and contextual QA
(the SQuAD prompt of METHOD §5 answered with its gold answer). The loss of a response is the mean
negative log-likelihood of its content tokens given everything before it, computed in one forward
pass with steering active on the prompt part only (the response's own keys are "generated" keys
and keep weight 1, as during decoding). A steering configuration passes when, for every set, the
mean loss rises by at most ``margin`` nats over the unsteered model.

Data: a JSONL file of ``{"messages": [...]}`` rows and a SQuAD file (HF rows or the original
JSON); without them a small built-in set (written for ctxaware) keeps the command self-contained.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..chat import render
from ..errors import InputError, InputFileNotFoundError
from ..harness.qa import build_prompt as qa_prompt

BUILTIN_QA = [
    ("The Orrin lighthouse was built in 1871 from granite quarried on the island itself. Its lamp was "
     "converted to electricity in 1938 and automated in 1979.", "When was the lamp automated?", "in 1979"),
    ("Marta keeps bees on the roof of the library. She harvests honey twice a year, in June and in "
     "September, and sells it at the Saturday market.", "Where does Marta sell her honey?",
     "at the Saturday market"),
    ("The river Vell rises in the Karst hills and flows north for 212 kilometres before joining the "
     "Asta at the town of Brenn.", "Where does the Vell join the Asta?", "at the town of Brenn"),
    ("The committee chose copper for the new roof because it lasts for a century and needs no paint. "
     "The old roof had been made of slate.", "What was the old roof made of?", "slate"),
    ("In the experiment, seedlings grown under blue light were shorter but had thicker stems than those "
     "grown under red light.", "Which seedlings had thicker stems?", "those grown under blue light"),
    ("The museum opens at ten in the morning, except on Mondays, when it stays closed for cleaning.",
     "Why is the museum closed on Mondays?", "for cleaning"),
    ("Tomas repaired the clock tower in 1956 using parts from a Swiss railway station clock.",
     "Where did the parts come from?", "a Swiss railway station clock"),
    ("The recipe calls for two cups of flour, one egg and a pinch of salt, mixed and rested for an hour.",
     "How long should the dough rest?", "an hour"),
]
BUILTIN_INSTRUCTIONS = [
    ("Give me three tips for sleeping better.",
     "1. Go to bed and wake up at the same time every day.\n2. Keep your bedroom dark, quiet and cool.\n"
     "3. Avoid caffeine and screens in the hour before bed."),
    ("What is the difference between weather and climate?",
     "Weather is the state of the atmosphere at a given time and place, such as today's rain. Climate is "
     "the average pattern of weather in a region over many years."),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall,\ngolden light on quiet paths,\nthe year "
     "exhales slow."),
    ("Translate 'good morning' into French and Spanish.", "French: \"Bonjour.\" Spanish: \"Buenos días.\""),
    ("Explain what a prime number is.", "A prime number is a whole number greater than 1 that has no "
     "divisors other than 1 and itself. For example, 2, 3, 5 and 7 are prime, but 6 is not."),
    ("Suggest a name for a bakery.", "How about \"The Rising Loaf\"? It is warm, easy to remember and hints "
     "at fresh bread."),
    ("How do I boil an egg?", "Place the egg in a pot of cold water, bring it to a boil, then simmer for "
     "about 9 minutes for a hard-boiled egg. Cool it in cold water before peeling."),
    ("List the planets of the solar system in order.", "Mercury, Venus, Earth, Mars, Jupiter, Saturn, "
     "Uranus and Neptune."),
]


def _first_exchange(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]] | None:
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return None
        out.append({"role": m["role"], "content": str(m.get("content") or "")})
        if m["role"] == "assistant":
            return out if out[-1]["content"].strip() and any(x["role"] == "user" for x in out) else None
    return None


def _sample(rows: list, n: int) -> list:
    return rows if len(rows) <= n else random.Random(0).sample(rows, n)


def instruction_set(path: str | Path | None, n: int, *, max_chars: int = 1500) -> tuple[str, list[list[dict]]]:
    """``(source, conversations)``: ``n`` first exchanges (seeded sample of those under ``max_chars``)."""
    if not path:
        return "builtin", [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                           for u, a in BUILTIN_INSTRUCTIONS[:n]]
    p = Path(path)
    if not p.is_file():
        raise InputFileNotFoundError(f"guard instructions file not found: {path} (a JSONL file of "
                                     "{{'messages': [...]}} rows, or leave --instructions empty)")
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            conv = _first_exchange(json.loads(line).get("messages") or [])
            if conv and sum(len(m["content"]) for m in conv) <= max_chars:
                rows.append(conv)
    if not rows:
        raise InputError(f"{path}: no conversation with a user turn and a non-empty first response")
    return str(p), _sample(rows, n)


def qa_set(path: str | Path | None, n: int, *, max_chars: int = 1500) -> tuple[str, list[list[dict]]]:
    """``(source, conversations)``: SQuAD prompts answered with the (first) gold answer."""
    if not path:
        items = [(c, q, a) for c, q, a in BUILTIN_QA]
        source = "builtin"
    else:
        from ..harness.data import parse_records

        p = Path(path)
        if not p.is_file():
            raise InputFileNotFoundError(f"guard QA file not found: {path} (a SQuAD .jsonl/.json file, or "
                                         "leave --qa empty)")
        text = p.read_text(encoding="utf-8")
        doc = [json.loads(x) for x in text.splitlines() if x.strip()] if p.suffix == ".jsonl" else json.loads(text)
        records = [r for r in parse_records("squad", doc, str(p)) if len(r["passage"]) <= max_chars and r["answers"]]
        if not records:
            raise InputError(f"{path}: no SQuAD question with a passage under {max_chars} characters")
        items = [(r["passage"], r["question"], r["answers"][0]) for r in _sample(records, n)]
        source = str(p)
    return source, [[{"role": "user", "content": qa_prompt("squad", c, q)}, {"role": "assistant", "content": a}]
                    for c, q, a in items[:n]]


def response_losses(model: Any, tokenizer: Any, conversations: Sequence[list[dict]], steering: Any = None, *,
                    batch_tokens: int = 4096) -> list[float]:
    """Mean token NLL of each conversation's first assistant response (steered by ``steering`` if given).

    Conversations are right-padded into batches of at most ``batch_tokens`` padded tokens (a causal
    model never lets a real token see the pads after it, so no padding mask is needed). Under
    steering, row ``b``'s keys from its response start on are marked emphasised (weight 1), which
    is exactly how generated keys are treated; only logits of response positions are computed.
    """
    rendered = [render(tokenizer, messages) for messages in conversations]
    return losses_of_rendered(model, rendered, steering, batch_tokens=batch_tokens)


def losses_of_rendered(model: Any, rendered: Sequence[Any], steering: Any = None, *, batch_tokens: int = 4096
                       ) -> list[float]:
    """:func:`response_losses` for conversations already rendered (``RenderedChat`` with an assistant span)."""
    from ..steering import steer
    from ..steering.context import emphasis_mask

    device = next(model.parameters()).device
    active = steering is not None and steering.active
    items = []
    for i, r in enumerate(rendered):
        span = next((s for s in r.spans if s.role == "assistant" and s.end > s.start), None)
        if span is None or span.start < 1:
            raise InputError("a guard conversation has no assistant response after its prompt")
        items.append((i, r, span.start, span.end))
    items.sort(key=lambda x: x[3])
    # under the share rule the response keys must stay "generated" keys (in neither the emphasised nor
    # the down-weighted set): rows of one batch then need the same prompt length
    same_start = active and getattr(steering, "rule", "alpha") == "share"
    out: dict[int, float] = {}
    lo = 0
    while lo < len(items):
        hi = lo + 1
        while hi < len(items) and (hi + 1 - lo) * items[hi][3] <= batch_tokens and (
                not same_start or items[hi][2] == items[lo][2]):
            hi += 1
        batch = items[lo:hi]
        lo = hi
        width = max(x[3] for x in batch)
        first = min(x[2] for x in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (_, r, _, end) in enumerate(batch):
            ids[b, :end] = torch.tensor(r.input_ids[:end])
        emphasis = None
        if active:
            p_len = max(x[2] for x in batch)
            emphasis = torch.ones(len(batch), p_len, dtype=torch.bool)
            for b, (_, r, start, _) in enumerate(batch):
                emphasis[b, :start] = emphasis_mask(r, steering.emphasis_roles)[0, :start]
        keep = width - first + 1
        with torch.inference_mode(), steer(model, steering, emphasis) if active else _null():
            logits = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=keep).logits
        base = width - keep  # absolute position of logits[:, 0]
        for b, (i, _, start, end) in enumerate(batch):
            row = logits[b, start - 1 - base:end - 1 - base].double()
            out[i] = float(torch.nn.functional.cross_entropy(row, ids[b, start:end].to(device), reduction="mean"))
    return [out[i] for i in range(len(rendered))]


def _null():
    import contextlib

    return contextlib.nullcontext()


@dataclass
class GuardSet:
    """One guard set and its unsteered losses (the baseline every candidate is compared with)."""

    name: str
    source: str
    conversations: list[list[dict]]
    baseline: list[float]

    @property
    def baseline_mean(self) -> float:
        return sum(self.baseline) / len(self.baseline)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


class Guard:
    """The quality guard of one calibration: guard sets with baselines, and the margin."""

    def __init__(self, model: Any, tokenizer: Any, sets: dict[str, tuple[str, list[list[dict]]]], margin: float,
                 baselines: dict[str, list[float]] | None = None):
        """``baselines``: unsteered losses per set already computed (a resumed run); computed when missing."""
        self.model, self.tokenizer, self.margin = model, tokenizer, float(margin)
        known = baselines or {}
        self.sets = [GuardSet(name, src, convs, list(known[name]) if len(known.get(name) or ()) == len(convs)
                              else response_losses(model, tokenizer, convs))
                     for name, (src, convs) in sets.items()]
        self._rendered = {gs.name: [render(tokenizer, c) for c in gs.conversations] for gs in self.sets}

    def check(self, steering: Any) -> dict[str, Any]:
        """``{"passed": bool, "<set>": {"loss", "baseline", "rise", "se"}}`` for one steering config."""
        report: dict[str, Any] = {"passed": True, "margin": self.margin}
        for gs in self.sets:
            if steering is None or not steering.active:
                losses = list(gs.baseline)  # the identity: nothing to recompute
            else:
                losses = losses_of_rendered(self.model, self._rendered[gs.name], steering)
            mean, _ = mean_se(losses)
            rise = mean - gs.baseline_mean
            diffs = [a - b for a, b in zip(losses, gs.baseline)]
            report[gs.name] = {"loss": mean, "baseline": gs.baseline_mean, "rise": rise, "se": mean_se(diffs)[1]}
            report["passed"] = report["passed"] and rise <= self.margin
        return report

    def judge(self, report: dict[str, Any]) -> dict[str, Any]:
        """``report`` (of :meth:`check`, possibly under another margin) with margin and verdict of this guard."""
        out = dict(report, margin=self.margin)
        out["passed"] = all(out[gs.name]["rise"] <= self.margin for gs in self.sets)
        return out

    def baselines(self) -> dict[str, list[float]]:
        """The unsteered losses per set (what ``baselines=`` takes back)."""
        return {gs.name: list(gs.baseline) for gs in self.sets}

    def describe(self) -> dict[str, Any]:
        return {"margin_nats": self.margin,
                "sets": {gs.name: {"source": gs.source, "examples": len(gs.conversations),
                                   "baseline_loss": gs.baseline_mean} for gs in self.sets}}
