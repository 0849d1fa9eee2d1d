"""Configuration of a multi-document QA run (``ctxaware multidoc``): :class:`MultidocConfig`.

Modes are NIH's (``raw``/``chat`` with ``+prefix``, ``+ind``, ``+steer``) plus ``+steer-docs``:
steering that keeps only the documents of the user turn at full weight (instruction and question
are down-weighted like everything else), to compare with emphasising the whole turn (``+steer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigMixin, attn_implementation_field, device_map_field, field, trust_remote_code_field
from ..errors import ConfigError

MODES = "raw+prefix,chat+prefix,chat,chat+prefix+steer,chat+prefix+steer-docs,chat+prefix+ind"
FLAGS = ("prefix", "ind", "steer", "steer-docs")


def parse_mode(mode: str) -> tuple[str, frozenset[str]]:
    """``"chat+prefix+steer-docs"`` -> ``("chat", {"prefix", "steer-docs"})``; one line naming a bad part."""
    parts = [p.strip().lower() for p in str(mode).split("+") if p.strip()]
    if not parts or parts[0] not in ("raw", "chat"):
        raise ConfigError(f"mode {mode!r} must start with raw or chat, then flags among {', '.join(FLAGS)}")
    bad = [p for p in parts[1:] if p not in FLAGS]
    if bad:
        raise ConfigError(f"mode {mode!r}: unknown flag {bad[0]!r}; flags are {', '.join(FLAGS)}")
    flags = frozenset(parts[1:])
    if {"steer", "steer-docs"} <= flags:
        raise ConfigError(f"mode {mode!r}: choose steer (whole user turn) or steer-docs (documents only), not both")
    return parts[0], flags


def canonical_mode(mode: str) -> str:
    base, flags = parse_mode(mode)
    return "+".join([base] + [f for f in FLAGS if f in flags])


def _ints(value: Any, what: str) -> list[int]:
    items = value.split(",") if isinstance(value, str) else list(value if isinstance(value, (list, tuple)) else [value])
    try:
        out = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ConfigError(f"{what} must be integers, got {value!r}") from None
    if not out:
        raise ConfigError(f"{what} must list at least one value")
    return sorted(set(out))


@dataclass
class MultidocConfig(ConfigMixin):
    """Multi-document QA: k distractors around a gold paragraph placed at each position, every mode."""

    data: str | None = field(None, metavar="PATH",
                             help="SQuAD-format data: a .json (SQuAD v1.1 layout) / .jsonl (HF squad rows) file, or a "
                                  "folder holding squad.json(l) (default: $CTXAWARE_DATA_DIR)")
    model: str = field("embedded", help="model: 'embedded', a Hugging Face id, a local directory or a .gguf file")
    out: str = field("runs/multidoc", metavar="DIR", help="output directory (rerun with the same one to resume)")
    questions: int = field(20, help="questions (the first N whose gold paragraph has distractors enough)")
    k: Any = field("4", metavar="K1,K2,...", help="distractor paragraphs per prompt")
    positions: Any = field("all", metavar="P1,P2,...|all",
                           help="0-based positions of the gold paragraph among the k+1 documents (all: every one)")
    modes: Any = field(MODES, metavar="M1,M2,...", help="modes: raw/chat with +prefix, +ind, +steer (whole user "
                                                         "turn) or +steer-docs (only the documents)")
    phrasings: Any = field("0", metavar="I1,I2,...|all", help="instruction phrasings (0, 1, 2 or all; see docs/study.md)")
    seed: int = field(0, help="seed of the distractor choice")
    max_words: int = field(120, help="paragraphs are cut to their first N words (the gold one only when the "
                                     "answer stays inside)")
    max_new_tokens: int = field(32, help="greedy decoding budget per answer")
    steering: str | None = field(None, metavar="FILE", help="steering file for +steer modes (replaces --alpha/--heads)")
    alpha: float = field(0.9, help="steering strength of +steer modes, in (0, 1]")
    heads: str = field("all", metavar="SPEC", help="steered heads")
    shard: str | None = field(None, metavar="I/N", help="run only shard I of N (a later run without it merges)")
    batch_size: int = field(8, help="prompts decoded together")
    dtype: str = field("auto", choices=("float32", "bfloat16", "float16", "auto"),
                       help="model dtype: auto = bfloat16 where the hardware computes it fast, else float32")
    device: str | None = field(None, help="torch device (default: cuda, then mps, else cpu)")
    device_map: str | None = device_map_field()
    attn_implementation: str | None = attn_implementation_field()
    trust_remote_code: bool = trust_remote_code_field()
    overwrite: bool = field(False, help="discard results in --out of another configuration")
    plot: bool = field(True, help="draw the accuracy-by-position chart")
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self) -> None:
        from ..distributed import parse_shard

        if self.questions < 1:
            raise ConfigError(f"questions must be >= 1, got {self.questions}")
        self.k = _ints(self.k, "k")
        if min(self.k) < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")
        if str(self.positions).strip().lower() != "all":
            self.positions = _ints(self.positions, "positions")
            if min(self.positions) < 0 or max(self.positions) > min(self.k):
                raise ConfigError(f"positions must be in 0..{min(self.k)} (k + 1 documents), got {self.positions}")
        else:
            self.positions = "all"
        mode_list = self.modes.split(",") if isinstance(self.modes, str) else list(self.modes)
        self.modes = list(dict.fromkeys(canonical_mode(m) for m in mode_list if str(m).strip()))
        if not self.modes:
            raise ConfigError("modes must list at least one mode")
        from .prompts import INSTRUCTIONS

        if str(self.phrasings).strip().lower() == "all":
            self.phrasings = list(range(len(INSTRUCTIONS)))
        else:
            self.phrasings = _ints(self.phrasings, "phrasings")
            if max(self.phrasings) >= len(INSTRUCTIONS) or min(self.phrasings) < 0:
                raise ConfigError(f"phrasings must be in 0..{len(INSTRUCTIONS) - 1}, got {self.phrasings}")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_words < 10:
            raise ConfigError("max_new_tokens and batch_size must be >= 1 and max_words >= 10")
        parse_shard(self.shard)

    def positions_for(self, k: int) -> list[int]:
        return list(range(k + 1)) if self.positions == "all" else [p for p in self.positions if p <= k]

    @property
    def steered(self) -> bool:
        return any(parse_mode(m)[1] & {"steer", "steer-docs"} for m in self.modes)
