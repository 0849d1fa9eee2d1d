"""Reading and writing conversation datasets: JSONL, JSON, parquet, ``datasets`` names/directories.

Rows carry a conversation in Hugging Face ``messages`` format (``[{"role", "content"}]``) or in
ShareGPT ``conversations`` format (``[{"from", "value"}]``, ``human`` → ``user``, ``gpt`` →
``assistant``, ``system`` → ``system``; ``user``/``assistant`` are accepted as is).
:func:`row_messages` returns the messages of a row or raises :class:`RowError` with a short
machine-readable reason (``no_messages``, ``unknown_role:<r>``, ``non_string_content``, ...).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import InputError, InputFileNotFoundError, require

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant")


class RowError(InputError):
    """A row cannot be scored; ``reason`` is a short code kept in the output."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def convert_sharegpt(conversations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ShareGPT ``[{"from", "value"}]`` → ``[{"role", "content"}]`` (raises :class:`RowError`)."""
    out = []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise RowError("malformed_message", f"expected a mapping, got {type(turn).__name__}")
        who = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise RowError(f"unknown_role:{who}")
        out.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return out


def row_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The validated messages of a row (``messages`` or ShareGPT ``conversations``)."""
    if isinstance(row.get("messages"), list):
        messages = []
        for m in row["messages"]:
            if not isinstance(m, dict):
                raise RowError("malformed_message", f"expected a mapping, got {type(m).__name__}")
            messages.append({"role": m.get("role"), "content": m.get("content")})
    elif isinstance(row.get("conversations"), list):
        messages = convert_sharegpt(row["conversations"])
    else:
        raise RowError("no_messages", "the row has neither a 'messages' nor a 'conversations' list")
    for m in messages:
        if m["role"] not in MESSAGE_ROLES:
            raise RowError(f"unknown_role:{m['role']}")
        if not isinstance(m["content"], str):
            raise RowError("non_string_content", f"{type(m['content']).__name__} content in a {m['role']} message")
    return messages


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "messages" in data or "conversations" in data or len(lists) != 1:
            data = [data]
        else:
            data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of rows")
    return data


def read_rows(source: str | Path, *, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a ``.jsonl``/``.json``/``.parquet`` file, a saved ``datasets`` directory or a hub name."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        if suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".parquet":
            pq = require("pyarrow.parquet", "train")
            rows = pq.read_table(path).to_pylist()
        else:
            raise InputError(f"{path}: unknown format {suffix!r}; use .jsonl, .json or .parquet")
    elif path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            ds = datasets.load_dataset(str(path), split=split)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"{path}: no split {split!r} (available: {', '.join(ds)})")
            ds = ds[split]
        rows = ds.to_list()
    else:
        if str(source).endswith((".jsonl", ".json", ".parquet")) or str(source).startswith((".", "/", "~")):
            raise InputFileNotFoundError(f"input not found: {source}")
        import datasets

        try:
            rows = datasets.load_dataset(str(source), split=split).to_list()
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise InputFileNotFoundError(f"could not load dataset {source!r}: {str(exc).splitlines()[0]}") from exc
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise InputError(f"{source}: row {bad} is not a JSON object")
    return rows


def load_conversations(path_or_name: str | Path, *, split: str = "train") -> list[dict[str, Any]]:
    """Rows with a ``messages`` list (ShareGPT rows converted; other fields kept, ``conversations`` dropped).

    Rows whose conversation cannot be read (unknown role, non-string content ...) raise
    :class:`~ctxaware.errors.InputError` naming the row.
    """
    out = []
    for i, row in enumerate(read_rows(path_or_name, split=split)):
        try:
            messages = row_messages(row)
        except RowError as exc:
            raise InputError(f"{path_or_name}: row {i}: {exc}") from exc
        new = {k: v for k, v in row.items() if k != "conversations"}
        new["messages"] = messages
        out.append(new)
    return out


def write_rows(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSONL (``.jsonl``), a JSON list (``.json``) or parquet (``.parquet``), atomically."""
    import os

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".parquet":
        pa = require("pyarrow", "train")
        pq = require("pyarrow.parquet", "train")
        rows = list(rows)
        names = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
        try:
            table = pa.table({k: [r.get(k) for r in rows] for k in names})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"cannot write {out} as parquet (mixed column types?): {exc}; "
                             "write .jsonl instead") from exc
        pq.write_table(table, tmp)
    elif out.suffix == ".json":
        tmp.write_text(json.dumps(list(rows), ensure_ascii=False), encoding="utf-8")
    elif out.suffix in (".jsonl", ".ndjson"):
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise InputError(f"{out}: unknown output format {out.suffix!r}; use .jsonl or .parquet")
    os.replace(tmp, out)
    return out
