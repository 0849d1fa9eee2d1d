"""NIH result files: the resumable JSONL of cells, their timings, the manifest, and the summary.

``results.jsonl`` gets one JSON line per finished cell, flushed and fsynced as soon as the cell
is done, so ``kill -9`` loses at most the cells in flight. On reopening, a torn last line is cut
off and the finished cells are skipped by their key. A cell's record holds only what the cell
computed (no wall-clock time), and when a run ends the file is put in grid order, so a study
killed and resumed any number of times ends with the same ``results.jsonl``, byte for byte, as an
uninterrupted one. The seconds each cell took go to ``timings.jsonl`` (``{"key", "seconds"}``
lines, appended the same way), which the summary sums per mode. ``manifest.json`` records the result
identity of the directory (:mod:`ctxaware.identity`: model content, resolved dtype, device class, engine,
needle and haystack content, decoding budget, batch plan, ...), the configuration and library versions.
Each cell's key ends in the digest of its own identity (the directory's plus, for ``+steer`` modes, the
steering: rule, alpha or share, heads, emphasis, compounding), so cells of other grids, modes or steering
are computed beside the others, never reused for them. A directory of another identity is refused with one
line naming the field that differs; ``overwrite`` deletes every result in it (every shard's files too).
A directory written before identities existed (no ``identity`` in its manifest) is refused the same way:
rerun with ``--overwrite``.

One process at a time writes a given file: each store holds a lock (:class:`ctxaware.fsio.DirLock`,
``.niah.lock`` or ``.niah-shard-i-of-n.lock``) until :meth:`ResultStore.close`; a second process into the
same ``--out`` and shard, an unsharded run while shards are live, and ``--overwrite`` while any other
shard is live are refused with one line naming the holder (pid, host). A lock left by a killed process
is released by the kernel and taken over.

Shards (``--shard i/n``, or the processes of ``accelerate launch``) append to
``results.shard-i-of-n.jsonl`` and ``timings.shard-i-of-n.jsonl`` instead, so that shards never
write the same file (they share the manifest, written atomically with the same study). A run
without a shard reads every shard file as finished cells, writes them into ``results.jsonl`` in
grid order (the very lines the shards wrote) and their timings into ``timings.jsonl``, and
removes the shard files: the result is the ``results.jsonl`` an unsharded run writes.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from ..distributed import shard_files, shard_path
from ..errors import ConfigError, InputError, InputFileNotFoundError
from ..fsio import JsonlAppender, atomic_write_json, atomic_write_text, read_jsonl, repair_jsonl
from .scoring import format_table, summarize

RESULTS = "results.jsonl"
TIMINGS = "timings.jsonl"
MANIFEST = "manifest.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def cell_key(*, model: str, mode: str, needle: str, length: int, depth: float, haystack: str,
             identity: str) -> str:
    """The resume key of one cell: readable fields, then ``id=`` the digest of the cell's result identity
    (:func:`ctxaware.identity.result_identity`: model content, dtype, device class, engine, decoding, batch plan,
    needle and haystack content, and the steering of ``+steer`` modes, rule and share included)."""
    return f"{model}|{mode}|{needle}|L={int(length)}|d={depth:g}|{haystack}|id={identity}"


def versions() -> dict[str, str]:
    """Versions of ctxaware, torch, transformers and Python."""
    from .. import __version__

    out = {"ctxaware": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            out[mod] = "missing"
    return out


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data)  # temp file + fsync + rename


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``results.jsonl`` (or of the one in a directory); a torn last line is ignored.

    A corrupt line elsewhere is an :class:`InputError` naming the file and line.
    """
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS
    if not p.is_file():
        raise InputFileNotFoundError(f"no NIH results at {p}")
    return [r for r in read_jsonl(p, what="NIH results file") if isinstance(r, dict)]


def read_timings(directory: str | Path, path: str | Path | None = None) -> dict[str, float]:
    """Seconds per cell key from ``timings.jsonl`` (or ``path``; the last line of a key wins); empty when there
    is none."""
    p = Path(path) if path is not None else Path(directory) / TIMINGS
    if not p.is_file():
        return {}
    out: dict[str, float] = {}
    for r in read_jsonl(p, what="NIH timings file"):
        if isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("seconds"), (int, float)):
            out[r["key"]] = float(r["seconds"])
    return out


def with_seconds(records: Iterable[dict[str, Any]], timings: dict[str, float]) -> list[dict[str, Any]]:
    """``records`` with each cell's ``seconds`` from ``timings`` (records of older versions carry their own)."""
    return [{**r, "seconds": timings.get(r.get("key"), r.get("seconds", 0.0))} for r in records]


class ResultStore:
    """The output directory of one study: manifest check, finished cells, appending new ones.

    ``shard=(i, n)`` with ``n > 1`` appends to this shard's own files; ``n == 1`` merges any shard files
    found into ``results.jsonl`` at :meth:`finalize`.
    """

    def __init__(self, out: str | Path, identity: dict[str, Any], *, overwrite: bool = False,
                 config: dict[str, Any] | None = None, shard: tuple[int, int] = (0, 1)) -> None:
        from ..fsio import DirLock

        self.dir = Path(out)
        self.identity = identity
        self.config = config
        self.shard = shard
        self.merged = self.dir / RESULTS
        self.path = shard_path(self.merged, *shard)
        self.timings = shard_path(self.dir / TIMINGS, *shard)
        self.done: dict[str, dict[str, Any]] = {}
        self.shard_inputs: list[Path] = []  # shard files an unsharded store merges
        self.lock = DirLock(self.dir, self._lock_name(*shard))
        self._open(overwrite)

    @staticmethod
    def _lock_name(i: int, n: int) -> str:
        return "niah" if n == 1 else f"niah-shard-{i}-of-{n}"

    @property
    def sharded(self) -> bool:
        return self.shard[1] > 1

    def _shard_files(self) -> list[Path]:
        return [p for _, _, p in shard_files(self.merged)] + [p for _, _, p in shard_files(self.dir / TIMINGS)]

    def _discard(self) -> None:
        """Delete every result of the directory (--overwrite): merged files, plots and every shard's files."""
        for name in (RESULTS, TIMINGS, SUMMARY_JSON, SUMMARY_MD):
            (self.dir / name).unlink(missing_ok=True)
        for png in self.dir.glob("*.png"):
            png.unlink()
        for p in self._shard_files():
            p.unlink(missing_ok=True)

    def _check_busy(self, overwrite: bool) -> None:
        """Refuse (one line) while a conflicting run writes here: the same shard, an unsharded run and a shard
        at once (a merge would take half-written shard files), or any other shard when overwriting."""
        from ..errors import BusyError
        from ..fsio import DirLock

        mine = self._lock_name(*self.shard)
        others = {k: v for k, v in DirLock.holders(self.dir).items() if k.startswith("niah") and k != mine}
        clash = [k for k in others if overwrite or k == "niah" or not self.sharded]
        if clash:
            info = others[clash[0]]
            what = "--overwrite would delete the files of" if overwrite else "another run writes"
            name = "the unsharded run" if clash[0] == "niah" else clash[0].replace("niah-", "").replace("-", " ")
            raise BusyError(f"{self.dir}: {what} {name} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
                            f"since {info.get('started', '?')}); wait for it to finish, or use another --out")

    def _open(self, overwrite: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # held until close(): a second process into this --out is refused, never doubled
        try:
            self._check_busy(overwrite)
            self._open_locked(overwrite)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        """Release this store's lock on the directory (done by :func:`run_niah` when the run ends)."""
        self.lock.release()

    def _open_locked(self, overwrite: bool) -> None:
        from ..identity import Identity

        manifest = self.dir / MANIFEST
        has_results = (self.merged.is_file() and self.merged.stat().st_size > 0) or bool(self._shard_files())
        if overwrite:
            self._discard()
        elif manifest.is_file():
            try:
                old = json.loads(manifest.read_text(encoding="utf-8")).get("identity")
            except (json.JSONDecodeError, AttributeError):
                old = None
            if old != self.identity and (has_results or old is not None):
                Identity(self.identity).require_same(old, f"{self.dir} (NIH)")  # one line naming the field
        elif has_results:
            raise ConfigError(f"{self.merged} exists without a manifest; use another --out or --overwrite")
        _write_json(manifest, {"identity": self.identity, **({"config": self.config} if self.config else {}),
                               "versions": versions(),
                               "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self._repair()
        for r in read_records(self.merged) if self.merged.is_file() else []:
            if "key" in r:
                self.done[r["key"]] = r
        in_merged = set(self.done)
        extra = [self.path] if self.sharded else [p for _, _, p in shard_files(self.merged)]
        for src in extra:  # this shard's own file, or (unsharded) every shard file to merge
            for r in read_records(src) if src.is_file() else []:
                if "key" in r and r["key"] not in in_merged:
                    self.done[r["key"]] = r
        if not self.sharded:
            self.shard_inputs = extra

    def _repair(self) -> None:
        """Cut a torn last line (from a kill mid-write) so appends start on a fresh line."""
        repair_jsonl(self.path)  # no newline, or a complete line that is not JSON (NUL padding)
        repair_jsonl(self.timings)

    def append(self, records: Iterable[dict[str, Any]], seconds: dict[str, float] | None = None) -> None:
        """Append finished cells (and, to the timings file, the seconds they took) durably before returning.

        Timings go first: a kill between the two appends leaves a timing whose cell is redone (the
        later timing wins), never a finished cell without its time.
        """
        records = list(records)
        if seconds:
            with JsonlAppender(self.timings) as app:
                app.write_many({"key": k, "seconds": round(float(v), 3)} for k, v in seconds.items())
        with JsonlAppender(self.path) as app:  # one fsync per batch of cells
            app.write_many(records)
        for r in records:
            self.done[r["key"]] = r

    def finalize(self, keys: list[str]) -> bool:
        """Rewrite this store's results file (atomically) with the cells of ``keys`` in that order, after any
        other cells it holds (in their file order); returns whether the file changed. An unsharded store
        first takes in the lines of every shard file, appends the shards' timings to ``timings.jsonl`` and
        then removes the shard files.

        Cells are appended as they finish, and which finish first depends on where earlier runs
        were interrupted; this makes the final file independent of that.
        """
        inputs = [self.path] + self.shard_inputs
        if not any(p.is_file() for p in inputs):
            return False
        data = self.path.read_bytes() if self.path.is_file() else b""
        wanted = set(keys)
        by_key: dict[str, bytes] = {}
        others: list[bytes] = []
        seen: set[str] = set()
        for n, src in enumerate(inputs):
            raw = data if n == 0 else src.read_bytes()
            for ln in raw.split(b"\n"):
                if not ln.strip():
                    continue
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:  # a torn last line of a shard killed mid-write
                    continue
                key = rec.get("key") if isinstance(rec, dict) else None
                if n and key in seen:  # results.jsonl first, then shards in order: the first line of a key wins
                    continue
                if key in wanted:
                    by_key[key] = ln
                else:
                    others.append(ln)
                if isinstance(key, str):
                    seen.add(key)
        ordered = others + [by_key[k] for k in keys if k in by_key]
        new = b"".join(ln + b"\n" for ln in ordered)
        changed = new != data
        if changed:
            atomic_write_text(self.path, new.decode("utf-8"))
        if self.shard_inputs:
            times = [r for _, _, p in shard_files(self.timings) for r in read_jsonl(p, what="NIH timings file")]
            if times:
                with JsonlAppender(self.timings) as app:
                    app.write_many(times)
            for p in self._shard_files():
                p.unlink(missing_ok=True)
            self.shard_inputs = []
        return changed


def write_plan(out: str | Path, keys: list[str]) -> None:
    """Record in ``manifest.json`` the cell keys of the run that wrote the summary (``"keys"``): the report shows
    those cells, never a blend with cells of other steering or grids that earlier runs left in the file."""
    path = Path(out) / MANIFEST
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("keys") != keys:
        _write_json(path, {**data, "keys": keys})


def write_summary(out: str | Path, records: list[dict[str, Any]], modes: list[str] | None = None,
                  extra: dict[str, Any] | None = None, *, threshold: float = 0.85) -> dict[str, dict[str, Any]]:
    """Write ``summary.json`` and ``summary.md`` (average recall error, effective length at ``threshold``
    per mode); return the summary.

    Each mode's ``seconds`` sums its cells' wall-clock times from ``out/timings.jsonl``.
    """
    out = Path(out)
    if not records:
        raise InputError(f"no finished NIH cells in {out}")
    summary = summarize(with_seconds(records, read_timings(out)), modes, threshold=threshold)
    _write_json(out / SUMMARY_JSON, {"modes": summary, "effective_threshold": threshold, **(extra or {})})
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    md = [f"# NIH summary: {records[0].get('model', '?')}, needle {records[0].get('needle', '?')}, "
          f"haystack {records[0].get('haystack', '?')}", "",
          f"Lengths (tokens): {', '.join(map(str, lengths))}; depths (%): {', '.join(f'{d:g}' for d in depths)}.",
          "", format_table(summary, markdown=True), "",
          f"Effective length: the longest tested length up to which the mean recall over depths is at least "
          f"{threshold:g} at every tested length; none: already below it at the shortest length ({lengths[0]}).",
          ""]
    atomic_write_text(out / SUMMARY_MD, "\n".join(md))
    return summary
