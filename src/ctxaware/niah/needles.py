"""Needles for the needle-in-a-haystack test: the built-in set of METHOD §5 and custom ones.

A :class:`Needle` is a sentence to hide, the question that retrieves it and the keywords that a
correct answer contains. Built-ins: ``SF``, ``SF-indicator``, ``pizza``, ``pizza-indicator`` and
``pizza-short`` (the reference's shorter pizza needle: only the first six ingredients, six keywords).
Custom needles come from a YAML/JSON file with ``needle``, ``question`` and ``keywords``; every
keyword must be one word that occurs in the needle as a whole word after normalisation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import read_config_file
from ..errors import ConfigError, InputFileNotFoundError
from ..scoring.indicator import INDICATOR
from .scoring import normalize_keyword, normalize_words


@dataclass(frozen=True)
class Needle:
    """A fact to hide (``needle``), the ``question`` asking for it and the ``keywords`` to score."""

    name: str
    needle: str
    question: str
    keywords: tuple[str, ...]

    def __post_init__(self) -> None:
        validate_needle(self)

    @property
    def prefix(self) -> str:
        """The response prefix of the ``+prefix`` modes: the needle's first 8 words."""
        return " ".join(self.needle.split(" ")[:8])

    def with_indicator(self) -> Needle:
        """The same needle with ``" [IND]"`` appended to the question (no-op if already there)."""
        if self.question.rstrip().endswith(INDICATOR):
            return self
        return Needle(self.name + "-indicator", self.needle, self.question + " " + INDICATOR, self.keywords)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keywords"] = list(self.keywords)
        return d

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def validate_needle(n: Needle) -> None:
    """Raise :class:`ConfigError` unless needle, question and keywords are usable."""
    for attr in ("needle", "question"):
        value = getattr(n, attr)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"needle {n.name!r}: {attr!r} must be a non-empty string")
    if not n.keywords:
        raise ConfigError(f"needle {n.name!r}: 'keywords' must list at least one word")
    words = set(normalize_words(n.needle))
    for k in n.keywords:
        norm = normalize_keyword(k)
        if norm is None:
            raise ConfigError(f"needle {n.name!r}: keyword {k!r} must be a single word (scoring matches whole "
                              "words after lower-casing and turning punctuation into spaces)")
        if norm not in words:
            raise ConfigError(f"needle {n.name!r}: keyword {k!r} does not occur as a whole word in the needle "
                              f"{n.needle!r}")


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

NEEDLES: dict[str, Needle] = {
    "SF": Needle("SF", _SF, _SF_Q, _SF_K),
    "SF-indicator": Needle("SF-indicator", _SF, _SF_Q + " " + INDICATOR, _SF_K),
    "pizza": Needle("pizza", _PIZZA, _PIZZA_Q, _PIZZA_K),
    "pizza-indicator": Needle("pizza-indicator", _PIZZA, _PIZZA_Q + " " + INDICATOR, _PIZZA_K),
    "pizza-short": Needle("pizza-short", _PIZZA_SHORT, _PIZZA_Q, _PIZZA_K[:6]),
}


def needle_from_dict(data: dict, *, name: str) -> Needle:
    """Build and validate a needle from a mapping with ``needle``, ``question``, ``keywords`` (``name`` optional)."""
    if not isinstance(data, dict):
        raise ConfigError(f"needle {name!r}: expected a mapping with needle, question and keywords")
    unknown = sorted(set(data) - {"name", "needle", "question", "keywords"})
    if unknown:
        raise ConfigError(f"needle {name!r}: unknown key(s) {', '.join(unknown)}; expected needle, question, keywords")
    missing = [k for k in ("needle", "question", "keywords") if k not in data]
    if missing:
        raise ConfigError(f"needle {name!r}: missing {', '.join(missing)}")
    kw = data["keywords"]
    if isinstance(kw, str):
        kw = [k.strip() for k in kw.split(",") if k.strip()]
    if not isinstance(kw, (list, tuple)):
        raise ConfigError(f"needle {name!r}: 'keywords' must be a list of words or a comma-separated string")
    return Needle(str(data.get("name") or name), data["needle"], data["question"], tuple(str(k) for k in kw))


def load_needle(spec: str | Needle | dict) -> Needle:
    """A built-in needle by name, a YAML/JSON file path, a mapping, or a :class:`Needle` as is."""
    if isinstance(spec, Needle):
        return spec
    if isinstance(spec, dict):
        return needle_from_dict(spec, name=str(spec.get("name", "custom")))
    if spec in NEEDLES:
        return NEEDLES[spec]
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise InputFileNotFoundError(f"needle file not found: {spec}")
        return needle_from_dict(read_config_file(path), name=path.stem)
    import difflib

    close = difflib.get_close_matches(spec, list(NEEDLES), 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown needle {spec!r}{hint}; built-ins: {', '.join(NEEDLES)}, or a YAML/JSON file")
