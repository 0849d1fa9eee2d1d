"""MT-Bench data in FastChat's ``llm_judge`` layout: questions, judge prompts, reference answers.

A data directory holds ``question.jsonl`` (``question_id``, ``category``, ``turns``: two user
turns), ``judge_prompts.jsonl`` (the judge templates; FastChat keeps it one level up, in
``llm_judge/data/``, and both places are read) and ``reference_answer/gpt-4.jsonl`` (GPT-4's
answers for the categories MT-Bench judges against a reference). Without a directory the three
files are downloaded once, from FastChat at a pinned commit and checked against their SHA-256,
into ``cache_dir()/mtbench`` (as the ``paul_graham`` haystack is).

Judging follows FastChat's single-answer grading (``fastchat/llm_judge/common.py``): turn 1 is
judged with ``single-v1`` (``single-math-v1`` with the reference answer for math, reasoning and
coding), turn 2 with the ``-multi-turn`` form of the same prompt over the whole conversation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, InputFileNotFoundError
from ..fsio import download_files

logger = logging.getLogger(__name__)

#: categories whose questions are judged against a reference answer (FastChat's NEED_REF_CATS)
NEED_REF_CATS = ("math", "reasoning", "coding")
PROMPT_NAMES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
#: FastChat's llm_judge data at the commit the shared data was taken from (Apache-2.0)
DATA_URL = ("https://raw.githubusercontent.com/lm-sys/FastChat/0e6d3e4beaab66f4d3f93db72541a4abab8af28d/"
            "fastchat/llm_judge/data/")
DATA_URL_ENV = "CTXAWARE_MTBENCH_URL"
#: file in the cache directory -> (path under DATA_URL, sha256 at the pinned commit)
DATA_FILES = {
    "question.jsonl": ("mt_bench/question.jsonl",
                       "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
    "judge_prompts.jsonl": ("judge_prompts.jsonl",
                            "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
    "reference_answer/gpt-4.jsonl": ("mt_bench/reference_answer/gpt-4.jsonl",
                                     "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
}


@dataclass(frozen=True)
class Question:
    """One MT-Bench question: two user turns and, where MT-Bench uses one, the reference answers."""

    question_id: Any
    category: str
    turns: tuple[str, str]
    reference: tuple[str, ...] | None = None

    @property
    def needs_reference(self) -> bool:
        return self.category in NEED_REF_CATS


def _read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputFileNotFoundError(f"{what} not found: {path}")
    rows = []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: invalid UTF-8 at byte {exc.start}; re-save the file as UTF-8") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {i}: not valid JSON ({exc.msg}); {what} is one JSON object per line") \
                from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows; {what} is one JSON object per line")
    return rows


def read_questions(path: str | Path, references: dict[Any, list[str]] | None = None) -> list[Question]:
    """The questions of ``path`` (FastChat ``question.jsonl``), each with its reference answers:
    from ``references`` (``reference_answer/gpt-4.jsonl``), else the question's own ``reference``."""
    path = Path(path)
    out, seen = [], set()
    for i, row in enumerate(_read_jsonl(path, "MT-Bench questions file"), 1):
        qid, cat, turns = row.get("question_id"), row.get("category"), row.get("turns")
        if qid is None or isinstance(qid, (dict, list)) or not isinstance(cat, str) or not cat:
            raise InputError(f"{path}, line {i}: a question needs 'question_id' and 'category' "
                             "(FastChat's question.jsonl layout)")
        if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) and t.strip() for t in turns)):
            raise InputError(f"{path}, line {i} (question {qid}): 'turns' must be a list of two non-empty strings")
        if qid in seen:
            raise InputError(f"{path}, line {i}: question_id {qid!r} appears twice")
        seen.add(qid)
        ref = (references or {}).get(qid) or row.get("reference")
        if ref is not None and not (isinstance(ref, list) and all(isinstance(r, str) for r in ref)):
            raise InputError(f"{path}, line {i} (question {qid}): 'reference' must be a list of strings")
        if cat in NEED_REF_CATS and (not ref or len(ref) < 2):
            raise InputError(f"{path}, line {i}: question {qid} ({cat}) has no reference answer for both turns; "
                             "MT-Bench judges this category against one: add it to reference_answer/gpt-4.jsonl "
                             "or as 'reference': [turn1, turn2]")
        out.append(Question(qid, cat, (turns[0], turns[1]), tuple(ref) if ref else None))
    return out


def read_references(path: str | Path) -> dict[Any, list[str]]:
    """``question_id -> [turn 1, turn 2]`` reference answers of a FastChat model-answer file."""
    out = {}
    for i, row in enumerate(_read_jsonl(Path(path), "MT-Bench reference answers"), 1):
        try:
            out[row["question_id"]] = list(row["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{path}, line {i}: expected FastChat's model-answer layout "
                             "{question_id, choices: [{turns: [...]}]}") from None
    return out


def read_judge_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    """The judge prompts of ``judge_prompts.jsonl`` by name; the four single-answer ones must be there."""
    prompts = {r.get("name"): r for r in _read_jsonl(Path(path), "MT-Bench judge prompts")}
    missing = [n for n in PROMPT_NAMES if n not in prompts]
    if missing:
        raise InputError(f"{path}: judge prompt(s) {', '.join(missing)} missing; use FastChat's judge_prompts.jsonl")
    for n in PROMPT_NAMES:
        if not isinstance(prompts[n].get("prompt_template"), str) or not isinstance(prompts[n].get("system_prompt"),
                                                                                      str):
            raise InputError(f"{path}: judge prompt {n!r} needs 'system_prompt' and 'prompt_template' strings")
    return prompts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_data_dir(*, download: bool = True) -> Path:
    """The MT-Bench files in ``cache_dir()/mtbench``, downloaded and checked on first use."""
    from ..models import cache_dir

    target = cache_dir() / "mtbench"
    if all((target / name).is_file() for name in DATA_FILES):
        return target
    if not download:
        raise InputFileNotFoundError(f"the MT-Bench data is not in {target}")
    base = os.environ.get(DATA_URL_ENV) or DATA_URL
    logger.warning("downloading the MT-Bench questions, judge prompts and reference answers into %s", target)
    download_files(target, base, DATA_FILES, what="the MT-Bench data", pinned="FastChat's file at the pinned commit",
                   offline_hint="pass --data-dir DIR (FastChat's llm_judge/data/mt_bench layout)")
    return target


def _judge_prompts_file(data_dir: Path) -> Path:
    for p in (data_dir / "judge_prompts.jsonl", data_dir.parent / "judge_prompts.jsonl"):
        if p.is_file():
            return p
    raise InputFileNotFoundError(f"judge_prompts.jsonl not found in {data_dir} or {data_dir.parent}; "
                                 "--data-dir takes FastChat's llm_judge/data/mt_bench layout")


@dataclass
class MtBenchData:
    """Questions, judge prompts and where they came from."""

    questions: list[Question]
    prompts: dict[str, dict[str, Any]]
    source: str


def load_data(data_dir: str | Path | None = None, questions: str | Path | None = None) -> MtBenchData:
    """The MT-Bench data of ``data_dir`` (default: the cached download); ``questions`` replaces its
    questions file (the references and judge prompts still come from ``data_dir``)."""
    root = Path(data_dir) if data_dir else cached_data_dir()
    if not root.is_dir():
        raise InputFileNotFoundError(f"MT-Bench data directory not found: {root}; pass FastChat's "
                                     "llm_judge/data/mt_bench folder (question.jsonl, reference_answer/)")
    ref_file = root / "reference_answer" / "gpt-4.jsonl"
    refs = read_references(ref_file) if ref_file.is_file() else {}
    qfile = Path(questions) if questions else root / "question.jsonl"
    return MtBenchData(read_questions(qfile, refs), read_judge_prompts(_judge_prompts_file(root)), str(qfile))


def select(questions: Sequence[Question], limit: int | None) -> list[Question]:
    """The first ``limit`` questions taking one per category in turn (so a small limit covers every
    category), in file order within a category; all of them when ``limit`` is None."""
    if limit is None or limit >= len(questions):
        return list(questions)
    by_cat: dict[str, list[Question]] = {}
    for q in questions:
        by_cat.setdefault(q.category, []).append(q)
    out: list[Question] = []
    depth = 0
    while len(out) < limit:
        for qs in by_cat.values():
            if depth < len(qs) and len(out) < limit:
                out.append(qs[depth])
        depth += 1
    return out


def judge_messages(question: Question, answers: Sequence[str], turn: int,
                   prompts: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """The judge prompt's name and the chat messages (system + user) that grade ``turn`` (1 or 2)."""
    ref = question.needs_reference
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    kwargs: dict[str, str] = {}
    if ref:
        kwargs["ref_answer_1"] = question.reference[0]  # type: ignore[index]
        if turn == 2:
            kwargs["ref_answer_2"] = question.reference[1]  # type: ignore[index]
    if turn == 2:
        user = p["prompt_template"].format(question_1=question.turns[0], question_2=question.turns[1],
                                           answer_1=answers[0], answer_2=answers[1], **kwargs)
    else:
        user = p["prompt_template"].format(question=question.turns[0], answer=answers[0], **kwargs)
    return name, [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]
