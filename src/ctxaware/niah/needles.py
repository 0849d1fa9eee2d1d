"""Needles for the needle-in-a-haystack test: the built-in set of METHOD §5, harder tasks, custom files.

A :class:`Needle` is what one grid cell hides and asks for: one sentence (``needle``) or several
inserted together (``needles``), optional ``distractors`` (sentences that look like needles but
carry other values), the ``question`` and the ``keywords`` a correct answer contains (recall = the
fraction of them found). Built-ins: ``SF``, ``SF-indicator``, ``pizza``, ``pizza-indicator`` and
``pizza-short`` (the reference's shorter pizza needle: only the first six ingredients, six
keywords); the harder tasks ``multi-key``, ``multi-value``, ``multi-query`` and the literal-free
set ``literal-free``, ``literal-free-2``, ... live in :mod:`ctxaware.niah.tasks`.

Custom needles come from a YAML/JSON file (docs/niah.md)::

    question: What is the special magic number for the ruby lantern?
    needles: ["The special magic number for the ruby lantern is 73914."]   # or needle: one string
    keywords: [73914]                        # every keyword occurs in a needle as a whole word
    offsets: [0, 0.5]                        # optional: where each needle, then each distractor, goes
    distractors:                             # optional
      - text: The special magic number for the ruby ladder is 28406.
        values: [28406]                      # what recalling this distractor looks like
    prefix: The special magic number for the ruby lantern is     # optional +prefix answer opening
    questions: [Which number is the ruby lantern's special magic number?]   # optional other phrasings

Phrasings: ``questions`` lists other phrasings of ``question`` (the same answer); every built-in has
three. ``load_needle("SF")`` asks the first (the needle exactly as written before phrasings existed),
``load_needle("SF@q1")`` the second (named ``SF@q1`` in records, so results are per phrasing).

Placement: the texts (needles, then distractors) go at depths ``d + o·(100 − d)`` % of the
haystack for the cell's depth ``d`` and relative offsets ``o`` in [0, 1]; by default ``o = i/k``
for the ``i``-th of ``k`` texts, i.e. spread evenly from the cell's depth to the end (the first
needle exactly at the cell's depth, as a single needle). A needle written the old way
(``needle``, ``question``, ``keywords`` only) is exactly the single needle it always was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import read_config_file
from ..errors import ConfigError, InputFileNotFoundError
from ..scoring.indicator import INDICATOR
from .scoring import normalize_keyword, normalize_words

FILE_KEYS = ("name", "needle", "needles", "question", "questions", "keywords", "offsets", "distractors", "prefix")


@dataclass(frozen=True)
class Distractor:
    """A sentence inserted like a needle whose ``values`` (one-word keywords) answer a question not asked."""

    text: str
    values: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "values": list(self.values)}


@dataclass(frozen=True)
class Needle:
    """A fact to hide (``needle``, plus ``extra_needles`` inserted with it), the ``question`` asking for it,
    the ``keywords`` to score, and optional ``distractors``, relative ``offsets`` and answer ``answer_prefix``."""

    name: str
    needle: str
    question: str
    keywords: tuple[str, ...]
    extra_needles: tuple[str, ...] = ()
    offsets: tuple[float, ...] | None = None
    distractors: tuple[Distractor, ...] = ()
    answer_prefix: str | None = None
    questions: tuple[str, ...] = ()  # other phrasings of ``question``, asking for the same answer

    def __post_init__(self) -> None:
        validate_needle(self)

    @property
    def phrasings(self) -> tuple[str, ...]:
        """Every phrasing of the question, ``question`` first."""
        return (self.question, *self.questions)

    def phrased(self, i: int) -> Needle:
        """The needle asking its ``i``-th phrasing, without the others: phrasing 0 is the needle as written
        (same name and digest as a needle without ``questions``), phrasing ``i > 0`` is named ``<name>@q<i>``."""
        if not isinstance(i, int) or not 0 <= i < len(self.phrasings):
            raise ConfigError(f"needle {self.name!r} has {len(self.phrasings)} phrasing(s) (0..{len(self.phrasings) - 1}), "
                              f"asked for {i!r}")
        return dataclasses.replace(self, question=self.phrasings[i], questions=(),
                                   name=self.name if i == 0 else f"{self.name}@q{i}")

    @property
    def texts(self) -> tuple[str, ...]:
        """Every needle sentence, the first one first."""
        return (self.needle, *self.extra_needles)

    @property
    def inserts(self) -> tuple[str, ...]:
        """Every sentence placed in the haystack: the needles, then the distractors."""
        return self.texts + tuple(d.text for d in self.distractors)

    @property
    def single(self) -> bool:
        """True for a needle of the original format (one sentence, nothing else): its records are unchanged."""
        return not (self.extra_needles or self.distractors or self.offsets is not None or self.answer_prefix)

    @property
    def prefix(self) -> str:
        """The response prefix of the ``+prefix`` modes: ``answer_prefix``, else the needle's first 8 words."""
        return self.answer_prefix or " ".join(self.needle.split(" ")[:8])

    def depths(self, depth: float) -> list[float]:
        """Depth (percent) of each of :attr:`inserts` in a cell of depth ``depth``."""
        k = len(self.inserts)
        offsets = self.offsets if self.offsets is not None else [i / k for i in range(k)]
        return [depth + float(o) * (100.0 - depth) for o in offsets]

    def with_indicator(self) -> Needle:
        """The same needle with ``" [IND]"`` appended to the question (no-op if already there)."""
        if self.question.rstrip().endswith(INDICATOR):
            return self
        return dataclasses.replace(self, name=self.name + "-indicator", question=self.question + " " + INDICATOR,
                                   questions=tuple(q + " " + INDICATOR for q in self.questions))

    def to_dict(self) -> dict:
        """The needle in the file format (a single needle: name, needle, question, keywords as always)."""
        if self.single:
            d0 = {"name": self.name, "needle": self.needle, "question": self.question, "keywords": list(self.keywords)}
            return {**d0, "questions": list(self.questions)} if self.questions else d0
        d: dict[str, Any] = {"name": self.name}
        if self.extra_needles:
            d["needles"] = list(self.texts)
        else:
            d["needle"] = self.needle
        d.update(question=self.question, keywords=list(self.keywords))
        if self.questions:
            d["questions"] = list(self.questions)
        if self.offsets is not None:
            d["offsets"] = list(self.offsets)
        if self.distractors:
            d["distractors"] = [x.to_dict() for x in self.distractors]
        if self.answer_prefix:
            d["prefix"] = self.answer_prefix
        return d

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _one_word(n: Needle, what: str, word: str) -> str:
    norm = normalize_keyword(word)
    if norm is None:
        raise ConfigError(f"needle {n.name!r}: {what} {word!r} must be a single word (scoring matches whole "
                          "words after lower-casing and turning punctuation into spaces)")
    return norm


def validate_needle(n: Needle) -> None:
    """Raise :class:`ConfigError` (naming the bad key) unless texts, question, keywords, offsets and
    distractors are usable."""
    for attr in ("needle", "question"):
        value = getattr(n, attr)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"needle {n.name!r}: {attr!r} must be a non-empty string")
    for i, text in enumerate(n.extra_needles):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"needle {n.name!r}: 'needles[{i + 1}]' must be a non-empty string")
    seen = set()
    for i, q in enumerate(n.phrasings):
        if not isinstance(q, str) or not q.strip():
            raise ConfigError(f"needle {n.name!r}: 'questions[{i}]' must be a non-empty string")
        norm = " ".join(normalize_words(q))
        if norm in seen:
            raise ConfigError(f"needle {n.name!r}: the phrasing {q!r} repeats another one (phrasings must be distinct)")
        seen.add(norm)
    if not n.keywords:
        raise ConfigError(f"needle {n.name!r}: 'keywords' must list at least one word")
    words = {w for t in n.texts for w in normalize_words(t)}
    where = "the needle" if not n.extra_needles else "any of the needles"
    for k in n.keywords:
        if _one_word(n, "keyword", k) not in words:
            shown = repr(n.needle) if not n.extra_needles else ""
            raise ConfigError(f"needle {n.name!r}: keyword {k!r} does not occur as a whole word in {where} {shown}"
                              .rstrip())
    keywords = {normalize_keyword(k) for k in n.keywords}
    question = set(normalize_words(n.question))
    for i, d in enumerate(n.distractors):
        at = f"'distractors[{i}]'"
        if not isinstance(d, Distractor) or not isinstance(d.text, str) or not d.text.strip():
            raise ConfigError(f"needle {n.name!r}: {at} needs a non-empty 'text'")
        if not d.values:
            raise ConfigError(f"needle {n.name!r}: {at}: 'values' must list at least one word of its text")
        own = set(normalize_words(d.text))
        for v in d.values:
            norm = _one_word(n, f"{at} value", v)
            if norm not in own:
                raise ConfigError(f"needle {n.name!r}: {at} value {v!r} does not occur as a whole word in its "
                                  f"text {d.text!r}")
            if norm in keywords or norm in words or norm in question:
                raise ConfigError(f"needle {n.name!r}: {at} value {v!r} also occurs in the needles, keywords or "
                                  "question, so an answer recalling it would not show distraction")
    inserts = [t.strip() for t in n.inserts]
    if len(set(inserts)) < len(inserts):
        raise ConfigError(f"needle {n.name!r}: 'needles' and 'distractors' must be distinct sentences")
    if n.offsets is not None:
        if len(n.offsets) != len(inserts):
            raise ConfigError(f"needle {n.name!r}: 'offsets' needs one number per needle and distractor "
                              f"({len(inserts)}), got {len(n.offsets)}")
        if any(not isinstance(o, (int, float)) or isinstance(o, bool) or not 0 <= o <= 1 for o in n.offsets):
            raise ConfigError(f"needle {n.name!r}: 'offsets' must be numbers in [0, 1] (0 = the cell's depth, "
                              f"1 = the end), got {list(n.offsets)}")
    if n.answer_prefix is not None and (not isinstance(n.answer_prefix, str) or not n.answer_prefix.strip()):
        raise ConfigError(f"needle {n.name!r}: 'prefix' must be a non-empty string")


_SF = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
_SF_Q = "What is the best thing to do in San Francisco?"
_SF_K = ("eat", "sandwich", "sit", "dolores", "park", "sunny", "day")
_PIZZA = ("The secret ingredients needed to build the perfect pizza are figs, prosciutto, smoked applewood "
          "bacon, lemon, goat cheese, truffle honey, pear slices, espresso-soaked dates, gorgonzola dolce, "
          "and candied walnuts.")
_PIZZA_Q = "What are the secret ingredients needed to build the perfect pizza?"
_PIZZA_K = ("figs", "prosciutto", "smoked", "applewood", "bacon", "lemon", "goat", "cheese", "truffle", "honey",
            "pear", "slices", "espresso", "soaked", "dates", "gorgonzola", "dolce", "candied", "walnuts")
_PIZZA_SHORT = ("The secret ingredients needed to build the perfect pizza are figs, prosciutto, smoked applewood "
                "bacon and lemon.")

#: other phrasings of the built-in questions (same answer; phrasing 0 is the paper's question)
_SF_QS = ("If I visit San Francisco, what is the best thing for me to do there?",
          "According to the document, what should one do in San Francisco above all?")
_PIZZA_QS = ("Which secret ingredients does the perfect pizza need?",
             "List the secret ingredients required to make the perfect pizza.")


def _ind(questions: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(q + " " + INDICATOR for q in questions)


NEEDLES: dict[str, Needle] = {
    "SF": Needle("SF", _SF, _SF_Q, _SF_K, questions=_SF_QS),
    "SF-indicator": Needle("SF-indicator", _SF, _SF_Q + " " + INDICATOR, _SF_K, questions=_ind(_SF_QS)),
    "pizza": Needle("pizza", _PIZZA, _PIZZA_Q, _PIZZA_K, questions=_PIZZA_QS),
    "pizza-indicator": Needle("pizza-indicator", _PIZZA, _PIZZA_Q + " " + INDICATOR, _PIZZA_K,
                              questions=_ind(_PIZZA_QS)),
    "pizza-short": Needle("pizza-short", _PIZZA_SHORT, _PIZZA_Q, _PIZZA_K[:6], questions=_PIZZA_QS),
}


def _words(value: Any, what: str, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [k.strip() for k in value.split(",") if k.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"needle {name!r}: {what!r} must be a list of words or a comma-separated string")
    return tuple(str(k) for k in value)


def _distractors(value: Any, name: str) -> tuple[Distractor, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"needle {name!r}: 'distractors' must be a list of {{text, values}} mappings")
    out = []
    for i, d in enumerate(value):
        if not isinstance(d, dict) or set(d) - {"text", "values"} or "text" not in d or "values" not in d:
            raise ConfigError(f"needle {name!r}: 'distractors[{i}]' must be a mapping with exactly 'text' and "
                              f"'values', got {d!r}")
        if not isinstance(d["text"], str):
            raise ConfigError(f"needle {name!r}: 'distractors[{i}].text' must be a string")
        out.append(Distractor(d["text"], _words(d["values"], f"distractors[{i}].values", name)))
    return tuple(out)


def needle_from_dict(data: dict, *, name: str) -> Needle:
    """Build and validate a needle from a mapping in the file format (see the module doc)."""
    if not isinstance(data, dict):
        raise ConfigError(f"needle {name!r}: expected a mapping with needle (or needles), question and keywords")
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(f"needle {name!r}: unknown key(s) {', '.join(map(str, unknown))}; expected "
                          f"{', '.join(FILE_KEYS)}")
    if "needle" in data and "needles" in data:
        raise ConfigError(f"needle {name!r}: give 'needle' (one sentence) or 'needles' (a list), not both")
    questions = data.get("questions")
    if questions is not None:
        if isinstance(questions, str) or not isinstance(questions, (list, tuple)) or not questions \
                or not all(isinstance(q, str) for q in questions):
            raise ConfigError(f"needle {name!r}: 'questions' must be a non-empty list of phrasings of the question")
        first = data.get("question", questions[0])
        data = {**data, "question": first, "questions": [q for q in questions if q != first]}
    missing = [k for k in ("question", "keywords") if k not in data]
    if "needle" not in data and "needles" not in data:
        missing.insert(0, "needle")
    if missing:
        raise ConfigError(f"needle {name!r}: missing {', '.join(missing)}")
    name = str(data.get("name") or name)
    if "needles" in data:
        texts = data["needles"]
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"needle {name!r}: 'needles' must be a non-empty list of sentences")
    else:
        texts = [data["needle"]]
    offsets = data.get("offsets")
    if offsets is not None:
        if not isinstance(offsets, (list, tuple)):
            raise ConfigError(f"needle {name!r}: 'offsets' must be a list of numbers in [0, 1]")
        offsets = tuple(offsets)
    return Needle(name, texts[0], data["question"], _words(data["keywords"], "keywords", name),
                  extra_needles=tuple(texts[1:]), offsets=offsets,
                  distractors=_distractors(data.get("distractors") or [], name), answer_prefix=data.get("prefix"),
                  questions=tuple(data.get("questions") or ()))


def builtin_needles() -> dict[str, Needle]:
    """Every built-in needle and task by name."""
    from .tasks import TASKS

    return {**NEEDLES, **TASKS}


def load_needle(spec: str | Needle | dict, phrasing: int | None = 0) -> Needle:
    """A built-in needle or task by name, a YAML/JSON file path, a mapping, or a :class:`Needle` as is.

    ``phrasing``: which phrasing of the question the needle asks (:meth:`Needle.phrased`; 0, the first, is
    the needle exactly as before phrasings existed); ``None`` keeps every phrasing. A name or path ending
    in ``@q<i>`` (``SF@q1``, ``task.yaml@q2``) asks phrasing ``i``.
    """
    if isinstance(spec, Needle):
        return spec
    if isinstance(spec, str):
        import re

        m = re.fullmatch(r"(.+)@q(\d+)", spec.strip())
        if m:
            return load_needle(m.group(1), None).phrased(int(m.group(2)))
    full = _load_full(spec)
    return full if phrasing is None else full.phrased(phrasing)


def _load_full(spec: str | dict) -> Needle:
    if isinstance(spec, dict):
        return needle_from_dict(spec, name=str(spec.get("name", "custom")))
    known = builtin_needles()
    if spec in known:
        return known[spec]
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise InputFileNotFoundError(f"needle file not found: {spec}")
        data = read_config_file(path)
        try:
            return needle_from_dict(data, name=path.stem)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    import difflib

    close = difflib.get_close_matches(spec, list(known), 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown needle {spec!r}{hint}; built-ins: {', '.join(known)}, or a YAML/JSON file")
