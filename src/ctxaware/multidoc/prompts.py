"""Multi-document QA prompts: questions from SQuAD-format data, seeded distractors, the gold paragraph at a position.

The user turn (the layout of "Lost in the Middle", Liu et al. 2023)::

    {instruction}

    Document [1] (Title: {title}) {paragraph}
    ...
    Document [k+1] (Title: {title}) {paragraph}

    Question: {question}

``instruction`` is one of :data:`INSTRUCTIONS` (three phrasings of the same request). ``+prefix``
opens the answer with ``"Answer:"``; ``raw`` renders the same text without a template (as NIH's
``raw``); ``+ind`` appends `` [IND]`` to the question. Distractors are paragraphs of *other* articles
(another title; without titles another passage) in which no gold answer occurs (SQuAD-normalised),
drawn with ``random.Random(f"{seed}|{question id}")``: the same distractors, in the same order, at
every position of the gold paragraph and in every mode, so positions and modes are paired.
For ``+steer-docs`` the user span is narrowed to the documents' tokens (:func:`documents_only`).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..harness.qa import normalize_answer
from ..scoring.indicator import INDICATOR
from .config import parse_mode

INSTRUCTIONS = (
    "Write a high-quality answer for the given question using only the provided search results (some of which "
    "might be irrelevant).",
    "Answer the question below using only the documents provided. Some of the documents are irrelevant.",
    "Several documents follow, and only some of them matter. Read them and answer the question from them alone, "
    "briefly.",
)
PREFIX = "Answer:"


@dataclass(frozen=True)
class Question:
    """One SQuAD question with its gold paragraph."""

    id: str
    title: str
    passage: str
    question: str
    answers: tuple[str, ...]


@dataclass
class Built:
    """The user text of one prompt and where its documents block is in it (character range)."""

    user: str
    docs: tuple[int, int]
    question: str


def load_questions(path: str | None) -> list[Question]:
    """Questions of a SQuAD-format file or folder (``harness.data``'s readers: SQuAD JSON or HF rows)."""
    from ..harness.data import _read_rows, find_local_file, parse_records, resolve_data_dir

    if path is None:
        folder = resolve_data_dir(None)
        if folder is None:
            raise InputError("multidoc needs SQuAD-format data: pass --data FILE_OR_DIR (or set CTXAWARE_DATA_DIR)")
        p = find_local_file(folder, "squad")
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            p = find_local_file(p, "squad")
        elif not p.is_file():
            from ..errors import InputFileNotFoundError

            raise InputFileNotFoundError(f"SQuAD data not found: {path}")
    out = [Question(r["id"], r.get("title", ""), r["passage"], r["question"], tuple(r["answers"]))
           for r in parse_records("squad", _read_rows(p), str(p)) if r["answers"]]
    if not out:
        raise InputError(f"{p}: no answerable SQuAD question")
    return out


def select(questions: list[Question], n: int) -> list[Question]:
    """``n`` questions, one per paragraph in file order first (then the second of each paragraph, ...)."""
    rank: dict[str, int] = {}
    keyed = []
    for i, q in enumerate(questions):
        r = rank.get(q.passage, 0)
        rank[q.passage] = r + 1
        keyed.append((r, i, q))
    return [q for _, _, q in sorted(keyed, key=lambda t: (t[0], t[1]))][:n]


def _group(q: Question) -> str:
    return q.title or q.passage


def paragraphs(questions: list[Question]) -> list[tuple[str, str]]:
    """Every distinct (title, paragraph) of the data, in file order."""
    return list(dict.fromkeys((q.title, q.passage) for q in questions))


def distractors(q: Question, pool: list[tuple[str, str]], k: int, seed: int) -> list[tuple[str, str]]:
    """``k`` paragraphs of other articles that contain no gold answer, seeded by the question's id."""
    golds = [normalize_answer(a) for a in q.answers if normalize_answer(a)]
    cands = [(t, p) for t, p in pool if (t or p) != _group(q) and p != q.passage
             and not any(g in normalize_answer(p) for g in golds)]
    if len(cands) < k:
        raise InputError(f"question {q.id}: only {len(cands)} paragraphs of other articles lack its answer; "
                         f"{k} distractors needed (use a smaller --k or more data)")
    return random.Random(f"{seed}|{q.id}").sample(cands, k)


def _cut(text: str, max_words: int, answers: tuple[str, ...] = ()) -> str:
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    head = " ".join(words[:max_words])
    if not answers or any(a in head for a in answers):
        return head
    at = next((text.find(a) for a in answers if a in text), -1)
    if at < 0:
        return head
    center = len(text[:at].split())
    start = max(0, min(len(words) - max_words, center - max_words // 2))
    return " ".join(words[start:start + max_words])


def build_user(q: Question, others: list[tuple[str, str]], position: int, phrasing: int, *, indicator: bool = False,
               max_words: int = 120) -> Built:
    """The user text with the gold paragraph at ``position`` (0-based) among ``others`` kept in order."""
    docs = [(t, _cut(p, max_words)) for t, p in others]
    docs.insert(position, (q.title, _cut(q.passage, max_words, q.answers)))
    block = "\n\n".join(f"Document [{i + 1}] (Title: {t.replace('_', ' ') or 'untitled'}) {p}"
                        for i, (t, p) in enumerate(docs))
    question = q.question + (" " + INDICATOR if indicator else "")
    head = INSTRUCTIONS[phrasing] + "\n\n"
    return Built(head + block + "\n\nQuestion: " + question, (len(head), len(head) + len(block)), question)


def render_prompt(tokenizer: Any, built: Built, mode: str) -> Any:
    """The RenderedChat of one prompt in ``mode`` (the same messages as an NIH cell: empty system message)."""
    from ..niah.prompts import render_raw

    base, flags = parse_mode(mode)
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": built.user}]
    if "prefix" in flags:
        messages.append({"role": "assistant", "content": PREFIX})
    if base == "raw":
        rendered = render_raw(tokenizer, messages)
    else:
        from ..chat import render

        prefix = "prefix" in flags
        rendered = render(tokenizer, messages, add_generation_prompt=not prefix, continue_final_message=prefix)
    return documents_only(rendered, built) if "steer-docs" in flags else rendered


def documents_only(rendered: Any, built: Built) -> Any:
    """``rendered`` with its user span narrowed to the documents block (the emphasis of ``+steer-docs``);
    token ids and roles are unchanged, so only what steering keeps at full weight differs."""
    from ..errors import SteeringError

    user = next((s for s in rendered.spans if s.role == "user"), None)
    if user is None:
        raise SteeringError("steer-docs: the prompt has no user turn")
    c0, c1 = user.char_start + built.docs[0], user.char_start + built.docs[1]
    idx = [i for i, (s, e) in enumerate(rendered.offsets) if e > s and s >= c0 and e <= c1
           and user.start <= i < user.end]
    if not idx:
        raise SteeringError("steer-docs: no token lies inside the documents block")
    span = dataclasses.replace(user, start=idx[0], end=idx[-1] + 1, char_start=c0, char_end=c1)
    return dataclasses.replace(rendered, spans=[span if s is user else s for s in rendered.spans])


def short_answer(text: str) -> str:
    """What is scored: the answer up to its first line break or sentence end (". "), as the QA protocol stops."""
    text = text.strip().split("\n", 1)[0]
    cut = text.find(". ")
    return (text[:cut + 1] if cut >= 0 else text).strip()
