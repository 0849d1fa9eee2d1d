"""Contextual-QA prompts, the "contains" metric and the hooks the shipped lm-eval task YAMLs call.

Prompts (METHOD §5), zero-shot, one user turn:

- SQuAD / DROP: ``"{passage}\\nAnswer the question according to the above passage: {question}"``
- QuAC (first question of each dialogue): ``"{passage}\\nAnswer the question according to the above
  passage, using only a short piece of text copied from the passage: {question}"``

The indicator variant appends ``" [IND]"`` to the question. Each lm-eval doc carries its prompt in
``prompt`` and the task's chat-template switch in ``ctxaware_chat_template`` (read by the
``ctxaware`` model class; other lm-eval models ignore it). Metric "contains": 1 when any gold answer
occurs in the output, case-insensitively. :func:`exact_match` and :func:`f1` are SQuAD's (its answer
normalisation: lower case, no punctuation, no articles a/an/the, single spaces).
"""

from __future__ import annotations

import string
from typing import Any

from ..scoring.indicator import INDICATOR
from .data import DATASETS, load_records

TEMPLATE_FIELD = "ctxaware_chat_template"
_PUNCTUATION = frozenset(string.punctuation)
VARIANTS = ("ind", "no_ind", "no_template")
PROMPTS = {
    "squad": "{passage}\nAnswer the question according to the above passage: {question}",
    "drop": "{passage}\nAnswer the question according to the above passage: {question}",
    "quac": ("{passage}\nAnswer the question according to the above passage, using only a short piece of "
             "text copied from the passage: {question}"),
}


def build_prompt(dataset: str, passage: str, question: str, *, indicator: bool = False) -> str:
    """The user message for one question (``indicator`` appends " [IND]" to the question)."""
    return PROMPTS[dataset].format(passage=passage, question=question + (" " + INDICATOR if indicator else ""))


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(output: str, answers: list[str]) -> float:
    """1.0 when the normalised output equals a normalised gold answer (SQuAD's exact match)."""
    got = normalize_answer(output)
    return float(any(got == normalize_answer(a) for a in answers if a.strip()))


def f1(output: str, answers: list[str]) -> float:
    """SQuAD's token F1 of the normalised output against the best gold answer."""
    from collections import Counter

    pred = normalize_answer(output).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        if not gold or not pred:
            best = max(best, float(gold == pred)) if a.strip() else best
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def contains(output: str, answers: list[str]) -> float:
    """1.0 when any non-empty gold answer occurs in ``output`` (case-insensitive), else 0.0."""
    text = output.lower()
    return float(any(a.strip() and a.strip().lower() in text for a in answers))


def make_docs(dataset: str, variant: str, data_dir: Any = None) -> list[dict]:
    """lm-eval docs for one task variant (``ind``, ``no_ind``, ``no_template``)."""
    if variant not in VARIANTS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown task variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    docs = []
    for r in load_records(dataset, data_dir):
        prompt = build_prompt(dataset, r["passage"], r["question"], indicator=variant == "ind")
        docs.append({**r, "prompt": prompt, TEMPLATE_FIELD: variant != "no_template"})
    return docs


def load_task_dataset(qa_dataset: str, qa_variant: str, data_dir: Any = None, **_: Any):
    """``custom_dataset`` hook: ``{"validation": Dataset}`` for the YAML's ``dataset_kwargs``.

    lm-eval passes the run's metadata too (``--metadata data_dir=...``, model args, version); the
    unknown keys are ignored. ``data_dir`` falls back to ``$CTXAWARE_DATA_DIR``, then the hub.
    """
    import datasets

    if qa_dataset not in DATASETS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown qa_dataset {qa_dataset!r}; choose one of {', '.join(DATASETS)}")
    docs = make_docs(qa_dataset, qa_variant, data_dir)
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``process_results`` hook: the "contains" score of the (single) generation."""
    return {"contains": contains(results[0] if results else "", list(doc["answers"]))}
