"""Scoring a whole dataset: resumable, shardable, with a progress bar and a summary of bad rows.

While running, each finished batch is appended (and fsync'd) to ``OUT.partial.jsonl`` as one line
per row: ``{"_row": <input index>, "ctx_scores": ..., "ctx_score_reasons": ..., "ctx_score_error": ...}``
after a first metadata line (model, layer, options, shard). A rerun with the same output reads
the partial file and skips the rows already there, so ``kill -9`` loses at most the batch in
flight (a torn last line is cut off). When every row is done the output (``.jsonl``, ``.json``
or ``.parquet``) is written atomically (temp file + fsync + rename) in input order — each input
row plus the three ``ctx_*`` columns — and the partial file removed.

Sharding: shard ``i/n`` takes the rows whose index ``% n == i`` and writes
``OUT.shard-i-of-n.<ext>`` (rows keep their ``_row`` index); :func:`merge_shards` joins the
shards into ``OUT``. Under ``accelerate launch`` / ``torchrun`` the shard is taken from
``RANK``/``WORLD_SIZE``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distributed import parse_shard, shard_files, shard_path  # noqa: F401 (parse_shard re-exported)
from ..errors import ConfigError, InputError, InputFileNotFoundError
from ..fsio import JsonlAppender, read_jsonl
from .io import read_rows, write_rows
from .config import ScoringConfig
from .probe import Scorer

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("ctx_scores", "ctx_score_reasons", "ctx_score_error")
_WINDOW_BATCHES = 16


@dataclass
class ScoreSummary:
    """Counts of a scoring run."""

    output: Path
    layer: int | None = None
    rows: int = 0
    skipped: int = 0  # already scored by an earlier run
    turns_scored: int = 0
    turn_reasons: Counter = field(default_factory=Counter)
    row_errors: Counter = field(default_factory=Counter)
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "layer": self.layer, "rows": self.rows, "skipped": self.skipped,
                "turns_scored": self.turns_scored, "turn_reasons": dict(self.turn_reasons),
                "row_errors": dict(self.row_errors), "complete": self.complete}


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def _read_partial(path: Path) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """Metadata and done rows of a partial file; a torn last line (kill -9) is cut off the file."""
    if not path.is_file():
        return None, {}
    meta, done = None, {}
    for n, rec in enumerate(read_jsonl(path, repair=True, what="partial scoring file")):
        if not isinstance(rec, dict) or ("_meta" not in rec and not isinstance(rec.get("_row"), int)):
            raise InputError(f"{path}: record {n + 1} is not a scoring record; delete the file and rerun "
                             "(or pass --overwrite)")
        if "_meta" in rec:
            meta = rec["_meta"]
        else:
            done[int(rec["_row"])] = rec
    return meta, done


def _tally(summary: ScoreSummary, rec: dict[str, Any]) -> None:
    if rec.get("ctx_score_error"):
        summary.row_errors[str(rec["ctx_score_error"]).split(":")[0]] += 1
        return
    for s, r in zip(rec.get("ctx_scores") or [], rec.get("ctx_score_reasons") or []):
        if s is not None:
            summary.turns_scored += 1
        else:
            summary.turn_reasons[r or "unknown"] += 1


def _fingerprint(rows: list[dict[str, Any]]) -> str:
    """SHA-256 of the input rows: a resumed run must read the very same data."""
    import hashlib

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _size_proxy(row: dict[str, Any]) -> int:
    conv = row.get("messages", row.get("conversations"))
    if not isinstance(conv, list):
        return 0
    return sum(len(str(m.get("content", m.get("value", "")))) for m in conv if isinstance(m, dict))


def _plan_batches(rows: list[dict[str, Any]], mine: list[int], batch_size: int) -> list[list[int]]:
    """Fixed, length-bucketed batches: windows of rows in input order, sorted by text length.

    The plan depends only on the input and the batch size, so a resumed run recomputes a batch
    with exactly the same neighbours (and padding) as the interrupted run: identical scores.
    """
    batches = []
    window = batch_size * _WINDOW_BATCHES
    for lo in range(0, len(mine), window):
        ordered = sorted(mine[lo:lo + window], key=lambda i: _size_proxy(rows[i]))
        batches.extend(ordered[b:b + batch_size] for b in range(0, len(ordered), batch_size))
    return batches


def score_dataset(model, tokenizer, source: str | Path, out: str | Path, config: ScoringConfig | None = None, *,
                  shard: tuple[int, int] = (0, 1), split: str = "train", model_name: str | None = None,
                  progress: bool = True, overwrite: bool = False) -> ScoreSummary:
    """Score every row of ``source`` and write ``out`` (see the module docstring for resume/shard)."""
    config = config or ScoringConfig()
    index, count = shard
    out_path = shard_path(out, index, count)
    if out_path.suffix not in (".jsonl", ".json", ".parquet", ".ndjson"):
        raise ConfigError(f"output must end in .jsonl, .json or .parquet, got {out_path.name}")
    partial = _partial_path(out_path)
    summary = ScoreSummary(output=out_path)
    if overwrite:
        partial.unlink(missing_ok=True)
    elif out_path.exists():
        logger.warning("%s already exists: nothing to do (pass overwrite to score again)", out_path)
        summary.complete = True
        return summary
    rows = read_rows(source, split=split)
    if not rows:
        raise InputError(f"{source}: no rows to score (empty file or dataset); check the input")
    mine = [i for i in range(len(rows)) if i % count == index]
    scorer = Scorer(model, tokenizer, config)
    summary.layer = scorer.layer
    from ..identity import Identity, device_class, model_dtype, model_id, result_identity

    # the result identity: model by content, dtype, device class, scoring options, and the batch size (rows are
    # padded together, so in bf16 a score can depend on its batch)
    ident = result_identity("score", model=model_id(model_name), dtype=model_dtype(model), device=device_class(model),
                            prompt=_fingerprint(rows), batch={"batch_size": config.batch_size},
                            extra={**config.to_dict(), "layer": scorer.layer, "shard": [index, count]})
    meta = {"source": str(source), "split": split, "rows": len(rows), "sha256": _fingerprint(rows),
            "model": model_name, "layer": scorer.layer, "shard": [index, count], "config": config.to_dict(),
            "identity": ident.to_dict()}
    meta["config"].pop("batch_size", None)
    old_meta, done = _read_partial(partial)
    changed = sorted(k for k in set(meta) | set(old_meta or {}) if k not in ("source", "split", "identity")
                     and meta.get(k) != (old_meta or {}).get(k))
    if old_meta is not None and (changed or old_meta.get("identity") is None):
        raise ConfigError(f"{partial} was written by a run with different {', '.join(changed) or 'identity'} "
                          "(input data, model or scoring options); rerun with the same ones or pass --overwrite")
    if old_meta is not None:  # model content, dtype, device class, batch size: one line naming the field
        ident.require_same(Identity.from_dict(old_meta["identity"]), str(partial), fix="rerun with the same options, "
                           "or pass --overwrite")
    todo = [i for i in mine if i not in done]
    summary.rows, summary.skipped = len(mine), len(mine) - len(todo)
    for rec in done.values():
        _tally(summary, rec)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=summary.skipped, disable=not progress, desc="scoring", unit="row")
    from ..fsio import DirLock

    # one process per output file: a second one is refused in one line rather than appending the same rows twice
    with DirLock(out_path.parent, f"score-{out_path.name}"), JsonlAppender(partial) as fh:
        if old_meta is None:
            fh.write({"_meta": meta})
        for batch in _plan_batches(rows, mine, config.batch_size):
            if all(i in done for i in batch):
                continue
            records = []
            for i, row_score in zip(batch, scorer.score_many([rows[i] for i in batch])):
                if i in done:
                    continue
                rec = {"_row": i, **row_score.to_columns()}
                done[i] = rec
                _tally(summary, rec)
                records.append(rec)
            fh.write_many(records)  # one fsync per batch: a finished batch survives kill -9
            bar.update(len(records))
    bar.close()
    final = []
    for i in mine:
        row = {k: v for k, v in rows[i].items() if k not in SCORE_COLUMNS and k != "_row"}
        row.update({c: done[i].get(c) for c in SCORE_COLUMNS})
        if count > 1:
            row["_row"] = i
        final.append(row)
    write_rows(final, out_path)
    partial.unlink(missing_ok=True)
    summary.complete = True
    return summary


def merge_shards(out: str | Path, *, remove: bool = False) -> Path:
    """Join ``OUT.shard-i-of-n.<ext>`` files (all ``n`` of them) into ``OUT`` in input order."""
    out_path = Path(out)
    found: dict[int, dict[int, Path]] = {}
    for index, count, p in shard_files(out_path):
        found.setdefault(count, {})[index] = p
    if not found:
        raise InputFileNotFoundError(f"no shard files {out_path.stem}.shard-I-of-N{out_path.suffix} "
                                     f"in {out_path.parent}")
    if len(found) > 1:
        raise InputError(f"shard files with different counts {sorted(found)} next to {out_path}; remove the stale ones")
    (count, shards), = found.items()
    missing = [i for i in range(count) if i not in shards]
    if missing:
        raise InputError(f"shards {missing} of {count} are missing (still running, or not finished?)")
    rows = [r for i in range(count) for r in read_rows(shards[i])]
    rows.sort(key=lambda r: r["_row"])
    for r in rows:
        r.pop("_row", None)
    write_rows(rows, out_path)
    if remove:
        for p in shards.values():
            p.unlink()
    return out_path
