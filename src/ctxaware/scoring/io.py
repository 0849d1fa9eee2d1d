"""Reading and writing conversation datasets: JSONL, JSON, parquet, ``datasets`` names/directories.

Rows carry a conversation in Hugging Face ``messages`` format (``[{"role", "content"}]``) or in
ShareGPT ``conversations`` format (``[{"from", "value"}]``); role names go through the one map
:data:`ctxaware.chat.roles.ROLE_ALIASES` (``human`` → ``user``, ``gpt``/``bing``/... → ``assistant``).
:func:`row_messages` returns the messages of a row or raises :class:`RowError` with a short
machine-readable reason (``no_messages``, ``unknown_role:<r>``, ``non_string_content``, ...).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..chat.roles import ROLE_ALIASES, MessageError, to_messages
from ..errors import InputError, InputFileNotFoundError, require
from ..fsio import atomic_write

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = ROLE_ALIASES  # the one role-name map (ctxaware.chat.roles)


class RowError(InputError):
    """A row cannot be scored; ``reason`` is a short code kept in the output."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _row_error(exc: MessageError) -> RowError:
    where = f"message {exc.index}" if exc.index is not None else ""
    detail = "; ".join(x for x in (where + (f" field {exc.field!r}" if exc.field else ""), exc.detail) if x)
    return RowError(exc.reason, detail)


def convert_sharegpt(conversations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ShareGPT ``[{"from", "value"}]`` → ``[{"role", "content"}]`` (raises :class:`RowError`)."""
    try:
        return to_messages(list(conversations))
    except MessageError as exc:
        raise _row_error(exc) from None


def row_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The validated messages of a row (``messages`` or ShareGPT ``conversations``), through the one
    validation path of :func:`ctxaware.chat.roles.to_messages`."""
    if not isinstance(row, dict):
        raise RowError("malformed_row", f"expected a JSON object, got {type(row).__name__}")
    try:
        return to_messages(row)
    except MessageError as exc:
        raise _row_error(exc) from None


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: invalid UTF-8 at byte {exc.start}; re-save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_decode(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: invalid JSON ({exc.msg}); fix or delete that line") from None
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "messages" in data or "conversations" in data or len(lists) != 1:
            data = [data]
        else:
            data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of rows, got {type(data).__name__}")
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
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as exc:  # pyarrow.ArrowInvalid and friends: not a readable parquet file
                raise InputError(f"{path}: not a readable parquet file ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); re-export it") from None
        else:
            raise InputError(f"{path}: unknown format {suffix!r}; use .jsonl, .json or .parquet")
    elif path.is_dir():
        import datasets

        try:
            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError:
                ds = datasets.load_dataset(str(path), split=split)
        except Exception as exc:  # datasets raises many types for an unusable directory
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{path}: not a dataset directory datasets can load ({first}); pass a .jsonl, "
                             ".json or .parquet file, or a directory saved with Dataset.save_to_disk") from None
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
        except Exception as exc:  # offline hub, unknown name, gated repo ...: datasets raises many types
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputFileNotFoundError(f"could not load dataset {source!r} ({first}); check the name, or "
                                         "pass a local .jsonl/.json/.parquet file (offline: HF_DATASETS_OFFLINE=1 "
                                         "needs a cached copy)") from None
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
    out = Path(path)
    if out.suffix not in (".parquet", ".json", ".jsonl", ".ndjson"):
        raise InputError(f"{out}: unknown output format {out.suffix!r}; use .jsonl, .json or .parquet")
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
        with atomic_write(out, "wb") as fh:
            pq.write_table(table, fh)
    elif out.suffix == ".json":
        with atomic_write(out) as fh:
            fh.write(json.dumps(list(rows), ensure_ascii=False))
    else:
        with atomic_write(out) as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
