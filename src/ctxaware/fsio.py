"""Crash-safe file output: atomic writes, fsync'd JSONL appends and tolerant JSONL reading.

Every result file ctxaware writes goes through this module, so a ``kill -9`` (or a power cut on a
rented GPU) leaves either the old file or the new one, never a file that looks complete but is not:

- :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_write_json` /
  :func:`atomic_write_jsonl` / :func:`atomic_savefig` / :func:`atomic_write` write a temporary
  file next to the target, ``fsync`` it, ``os.replace`` it over the target and ``fsync`` the
  directory (POSIX), so the rename itself is durable.
- :class:`JsonlAppender` appends one JSON record per line and ``fsync`` s after each record (or
  batch of records): a finished record is on disk before the next starts.
- :func:`read_jsonl` reads such a file back. A torn **last** line (the record in flight when the
  process died) is dropped and, with ``repair=True``, cut off the file so appends continue on a clean
  line. A malformed line anywhere *else* is real corruption and raises
  :class:`~ctxaware.errors.InputError` naming the file and line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from .errors import InputError

logger = logging.getLogger(__name__)

# mkstemp creates 0600 files; a result file gets the mode an ordinary open() would give it (0666 & ~umask).
# The umask is read once, at import (reading it means setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - Windows has no directory fsync
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - unusual filesystems
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


fsync_dir = _fsync_dir  # public name: make a rename or a new file in ``directory`` durable


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root`` and every directory holding them (e.g. a training checkpoint)."""
    root = Path(root)
    if not root.is_dir():
        return
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(d))


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if os.name == "posix":
            os.fchmod(fd, _FILE_MODE)
        kwargs = {} if "b" in mode else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """``json.dumps(data)`` written atomically, with a trailing newline."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=default) + "\n")


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig`` (matplotlib) into ``path`` atomically; the format is the suffix's unless given."""
    target = Path(path)
    kwargs.setdefault("format", target.suffix.lstrip(".").lower() or "png")
    with atomic_write(target, "wb") as fh:
        fig.savefig(fh, **kwargs)
    return target


def atomic_write_jsonl(path: str | Path, records: Iterable[Any], *,
                       default: Callable[[Any], Any] | None = None) -> Path:
    """One JSON record per line, written atomically."""
    with atomic_write(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, default=default) + "\n")
    return Path(path)


class JsonlAppender:
    """Append JSON records to a file, one per line, ``fsync`` ed so a finished record survives a crash.

    Use as a context manager. :meth:`write` appends and syncs one record; :meth:`write_many` appends
    several and syncs once (one batch = one durability point). Before the first append a torn last
    line left by an earlier crash is cut off (:func:`repair_jsonl`).
    """

    def __init__(self, path: str | Path, *, sync: bool = True) -> None:
        self.path = Path(path)
        self.sync = sync
        self._fh: IO[str] | None = None

    def __enter__(self) -> JsonlAppender:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _commit(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        if self.sync:
            os.fsync(self._fh.fileno())

    def write(self, record: Any) -> None:
        self.write_many([record])

    def write_many(self, records: Iterable[Any]) -> None:
        if self._fh is None:
            raise RuntimeError("JsonlAppender used outside its 'with' block")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if lines:
            self._fh.write(lines)
            self._commit()


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one record to ``path`` and fsync (opens and closes the file; use :class:`JsonlAppender` in loops)."""
    with JsonlAppender(path) as app:
        app.write(record)


def repair_jsonl(path: str | Path) -> int:
    """Cut a torn last line (no trailing newline, or not valid JSON) off ``path``; return bytes removed."""
    p = Path(path)
    if not p.is_file():
        return 0
    data = p.read_bytes()
    if not data:
        return 0
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:  # complete line, but it may still be a torn write padded by the filesystem (NULs) or cut JSON
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        if not _parses(data[start:]):
            keep = start
    if keep < len(data):
        logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", p, len(data) - keep)
        with open(p, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return len(data) - keep


def _parses(line: bytes) -> bool:
    text = line.strip()
    if not text:
        return True
    try:
        json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def read_jsonl(path: str | Path, *, repair: bool = False, what: str = "results file") -> list[Any]:
    """Records of a JSONL file written by :class:`JsonlAppender`, tolerating a torn last line.

    The last line may be incomplete (no newline) or unparsable: it is dropped with a warning (and cut
    off the file when ``repair``). Any other bad line raises :class:`InputError` naming ``path`` and
    the line number; the fix is to remove that line or the file.
    """
    p = Path(path)
    if repair:
        repair_jsonl(p)
    data = p.read_bytes()
    lines = data.split(b"\n")
    records: list[Any] = []
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if n == last:
                logger.warning("%s: ignoring a torn last line left by an interrupted run", p)
                continue
            raise InputError(f"{p}:{n + 1}: corrupt line in the {what} ({type(exc).__name__}); delete that line "
                             "(or the file) and rerun") from None
    return records


def download_files(target: str | Path, base_url: str, files: dict[str, tuple[str, str | None]], *,
                   what: str, offline_hint: str, pinned: str = "the pinned file", timeout: float = 30.0) -> Path:
    """Download ``files`` (name under ``target`` -> (path under ``base_url``, sha256 or None)) into ``target``.

    All files go to a temporary directory beside ``target`` first, are checked against their sha256
    when one is given, and are then renamed into place, so an interrupted or refused download leaves
    no partial file in ``target``. A network or file error is one :class:`InputError` line saying what
    could not be downloaded from where, followed by ``offline_hint``; a hash mismatch names the file and
    ``pinned`` (where the expected content comes from).
    """
    import hashlib
    import shutil
    import urllib.error
    import urllib.request

    target = Path(target)
    if not base_url.endswith("/"):
        base_url += "/"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        for name, (remote, digest) in files.items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(base_url + remote, timeout=timeout) as resp:  # noqa: S310 (fixed URL)
                atomic_write_bytes(dest, resp.read())
            got = hashlib.sha256(dest.read_bytes()).hexdigest()
            if digest is not None and got != digest:
                raise InputError(f"{base_url + remote}: content differs from {pinned} (sha256 {got[:12]}, "
                                 f"expected {digest[:12]}); {offline_hint}")
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, target / name)
        _fsync_dir(target)
    except InputError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(f"could not download {what} from {base_url} ({exc}); you may be offline: "
                         f"{offline_hint}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class DirLock:
    """An exclusive advisory lock on ``DIR/.NAME.lock`` held by one live process (``fcntl.flock``).

    The file records who holds it (``pid``, ``host``, ``started``) for the one-line refusal. The kernel
    releases a ``flock`` when its holder dies, so a lock file left by a killed process is stale and is
    simply taken over; :meth:`holders` lists the live holders of a directory's locks (every shard of a run).
    """

    SUFFIX = ".lock"

    def __init__(self, directory: str | Path, name: str) -> None:
        self.path = Path(directory) / f".{name}{self.SUFFIX}"
        self.name = name
        self._fh: IO[Any] | None = None

    @staticmethod
    def _flock(fh: IO[Any]) -> bool:
        import fcntl

        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    @staticmethod
    def _info(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            data = {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> DirLock:
        """Take the lock, or raise :class:`~ctxaware.errors.BusyError` naming the live holder."""
        import datetime
        import socket

        from .errors import BusyError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        if not self._flock(fh):
            fh.close()
            info = self._info(self.path)
            raise BusyError(f"{self.path.parent} is being written by another run ({self.name}: pid "
                            f"{info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}); "
                            "wait for it to finish, or use another --out")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Give the lock back (the file stays: a later holder rewrites it)."""
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @classmethod
    def holders(cls, directory: str | Path) -> dict[str, dict[str, Any]]:
        """``{name: {pid, host, started}}`` of every lock in ``directory`` held by a live process (locks held by
        this process through another :class:`DirLock` count too); stale lock files are ignored."""
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(Path(directory).glob(f".*{cls.SUFFIX}")):
            try:
                fh = open(path, "a+", encoding="utf-8")
            except OSError:
                continue
            try:
                if cls._flock(fh):
                    import fcntl

                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                else:
                    out[path.name[1:-len(cls.SUFFIX)]] = cls._info(path)
            finally:
                fh.close()
        return out
