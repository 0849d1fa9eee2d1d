"""Configuration of a needle-in-a-haystack study: :class:`NiahConfig` and the presets.

``quick`` (the defaults of :class:`NiahConfig`) runs on the embedded model on CPU in minutes and
reaches 7k tokens, where the chat template starts to lose the needle; ``paper`` is the 20 × 20 grid
of METHOD §5. Lengths and depths are either listed explicitly or spaced evenly with
``round(linspace(min, max, num))`` exactly as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigMixin, attn_implementation_field, device_map_field, field, trust_remote_code_field
from ..engines import (check_engine, engine_field, pipeline_parallel_size_field, tensor_parallel_size_field,
                       vllm_options_field)
from ..errors import ConfigError

MODE_BASES = ("raw", "chat")
MODE_FLAGS = ("prefix", "ind", "steer")

#: fields that do not change results: they may differ between a run and its resumption
RUNTIME_FIELDS = ("out", "progress", "overwrite", "batch_size", "batch_memory", "prefix_cache", "prefill_chunk",
                  "device", "truncate", "effective_threshold", "shard")


def parse_mode(mode: str) -> tuple[str, frozenset[str]]:
    """Split ``"chat+prefix+steer"`` into its base and flags; :class:`ConfigError` on unknown parts."""
    parts = [p.strip() for p in str(mode).strip().split("+") if p.strip()]
    if not parts or parts[0] not in MODE_BASES:
        raise ConfigError(f"mode {mode!r} must start with one of {', '.join(MODE_BASES)} "
                          f"(e.g. chat, chat+steer, chat+prefix, raw)")
    flags = parts[1:]
    bad = [f for f in flags if f not in MODE_FLAGS]
    if bad:
        raise ConfigError(f"mode {mode!r}: unknown flag(s) {', '.join(bad)}; flags are {', '.join(MODE_FLAGS)}")
    return parts[0], frozenset(flags)


def canonical_mode(mode: str) -> str:
    """Canonical spelling of a mode: base, then ``+prefix``, ``+ind``, ``+steer`` in that order."""
    base, flags = parse_mode(mode)
    return "+".join([base] + [f for f in MODE_FLAGS if f in flags])


def _split(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        return items or None
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    raise ConfigError(f"{what} must be a comma-separated string or a list, got {value!r}")


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number") from None


def even_grid(start: float, stop: float, num: int) -> list[int]:
    """``round(linspace(start, stop, num))`` as ints (numpy's round half to even, like the paper)."""
    import numpy as np

    return [int(v) for v in np.round(np.linspace(start, stop, num))]


@dataclass
class NiahConfig(ConfigMixin):
    """One NIH study: model, haystack, needle, grid (lengths × depths × modes) and generation."""

    model: str = field("embedded", help="model: 'embedded', a Hugging Face id, a local directory or a .gguf file")
    haystack: str = field("builtin", metavar="SOURCE",
                          help="haystack: 'builtin' (corpus shipped with ctxaware), 'paul_graham' (downloaded "
                               "once into the user cache) or a .txt file / directory of .txt files")
    needle: str = field("SF", metavar="NEEDLE",
                        help="needle or task: SF, SF-indicator, pizza, pizza-indicator, pizza-short, multi-key, "
                             "multi-value, multi-query, literal-free, literal-free-2..6, or a YAML/JSON file with "
                             "needle (or needles), question, keywords and optional distractors, offsets, prefix "
                             "(docs/niah.md)")
    lengths: Any = field(None, metavar="L1,L2,...",
                         help="context lengths in tokens, comma-separated (default: "
                              "round(linspace(min-length, max-length, num-lengths)))")
    min_length: int = field(1000, help="smallest context length of the evenly spaced grid")
    max_length: int = field(7000, help="largest context length of the evenly spaced grid")
    num_lengths: int = field(4, help="number of evenly spaced context lengths")
    depths: Any = field(None, metavar="D1,D2,...",
                        help="needle depths in percent, comma-separated (default: "
                             "round(linspace(0, 100, num-depths)))")
    num_depths: int = field(5, help="number of evenly spaced depths from 0 to 100 %%")
    modes: Any = field("chat,chat+steer", metavar="M1,M2,...",
                       help="modes, comma-separated: raw (no template) or chat, each optionally +prefix "
                            "(needle's first 8 words open the answer), +ind (append [IND] to the question), "
                            "+steer (attention steering)")
    steering: str | None = field(None, metavar="FILE",
                                 help="steering file (from ctxaware calibrate) for +steer modes; replaces --alpha "
                                      "and --heads")
    alpha: float = field(0.9, help="steering strength of +steer modes: weight of non-user prompt keys, in (0, 1]")
    heads: str = field("all", metavar="SPEC",
                       help="steered heads of +steer modes: all, layers '0-11', or '3:0,5;7:all'")
    system: str = field("", help="system message (empty by default, as in the paper)")
    system_message: bool = field(True, help="send a system message at all; --no-system-message lets the chat "
                                            "template insert its own default system prompt")
    max_new_tokens: int = field(40, help="greedy decoding budget per answer")
    reserve: int = field(200, help="tokens of each length L kept for template, question and answer: haystack + "
                                   "needle get L - reserve tokens (L/2 when L < 2*reserve)")
    batch_size: int = field(8, help="cells decoded together (prefills stay one by one); a kill loses at most "
                                    "this many cells")
    batch_memory: float = field(4.0, help="GiB of KV cache a decoding batch may hold (peak about twice that)")
    prefix_cache: bool = field(True, help="reuse the KV cache of the prompt prefix shared with the previous cell")
    prefill_chunk: int = field(256, help="tokens per prefill step; steps start at multiples of it and a cached prefix "
                                         "is reused in whole steps, so an answer does not depend on the cell before")
    dtype: str = field("auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="model dtype; auto = bfloat16 where the hardware computes it fast, else float32 "
                            "(float32 for exact comparisons)")
    device: str | None = field(None, help="torch device (default: cuda, then mps, when present; else cpu; or the "
                                          "device of a model passed in)")
    device_map: str | None = device_map_field()
    attn_implementation: str | None = attn_implementation_field()
    trust_remote_code: bool = trust_remote_code_field()
    engine: str = engine_field()
    tensor_parallel_size: int = tensor_parallel_size_field()
    pipeline_parallel_size: int = pipeline_parallel_size_field()
    vllm_options: Any = vllm_options_field()
    truncate: bool = field(False, help="clamp context lengths beyond the model's window to the window (with a "
                                       "warning) instead of refusing them")
    effective_threshold: float = field(0.85, help="mean recall a length must reach for the effective length (the "
                                                  "longest length up to which every tested length reaches it)")
    shard: str | None = field(None, metavar="I/N",
                              help="run only the cells i, i+N, i+2N, ... of the grid (0 <= I < N) into "
                                   "results.shard-I-of-N.jsonl of --out; a later run without --shard merges the "
                                   "shards (default under accelerate launch / torchrun: RANK/WORLD_SIZE, merged by "
                                   "the main process)")
    out: str = field("runs/niah-quick", metavar="DIR", help="output directory (rerun with the same one to resume; "
                                                            "finished cells are reused whatever the grid; other modes "
                                                            "or steering are computed beside them, keyed apart)")
    overwrite: bool = field(False, help="delete every result in --out first (every shard's files too; refused while "
                                        "another process writes there); without it, a directory of another "
                                        "configuration (model, dtype, needle, ...) is refused naming the field")
    progress: bool = field(True, help="show a progress bar")

    def __post_init__(self) -> None:
        lengths = _split(self.lengths, "lengths")
        self.lengths = None if lengths is None else [int(_number(v, "lengths")) for v in lengths]
        depths = _split(self.depths, "depths")
        if depths is not None:
            vals = [_number(v, "depths") for v in depths]
            self.depths = [int(v) if float(v).is_integer() else v for v in vals]
        modes = _split(self.modes, "modes")
        if not modes:
            raise ConfigError("modes must name at least one mode (e.g. chat,chat+steer)")
        canon = [canonical_mode(m) for m in modes]
        dup = sorted({m for m in canon if canon.count(m) > 1})
        if dup:
            raise ConfigError(f"modes: {', '.join(dup)} listed twice")
        self.modes = canon
        for name in ("min_length", "max_length", "num_lengths", "num_depths", "max_new_tokens", "batch_size",
                     "prefill_chunk"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not float(self.batch_memory) > 0:
            raise ConfigError(f"batch_memory must be a positive number of GiB, got {self.batch_memory}")
        if self.reserve < 0:
            raise ConfigError(f"reserve must be >= 0, got {self.reserve}")
        if self.min_length > self.max_length:
            raise ConfigError(f"min_length ({self.min_length}) is larger than max_length ({self.max_length})")
        if any(v < 1 for v in self.grid_lengths()):
            raise ConfigError(f"lengths must be positive token counts, got {self.lengths}")
        if any(not 0 <= d <= 100 for d in self.grid_depths()):
            raise ConfigError(f"depths must be percentages in [0, 100], got {self.depths}")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 < float(self.effective_threshold) <= 1.0:
            raise ConfigError(f"effective_threshold must be in (0, 1], got {self.effective_threshold}")
        if self.shard is not None:
            from ..distributed import parse_shard

            parse_shard(self.shard)
        if not isinstance(self.system, str):
            raise ConfigError("system must be a string")
        check_engine(self)

    def grid_lengths(self) -> list[int]:
        """Context lengths of the grid, ascending and unique."""
        values = self.lengths if self.lengths is not None else even_grid(self.min_length, self.max_length,
                                                                         self.num_lengths)
        return sorted(set(int(v) for v in values))

    def grid_depths(self) -> list[float]:
        """Depths (percent) of the grid, ascending and unique."""
        values = self.depths if self.depths is not None else even_grid(0, 100, self.num_depths)
        return sorted(set(values))

    def study_dict(self) -> dict[str, Any]:
        """The fields that define results (everything but run-time options such as ``out``)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_preset(cls, name: str = "quick", **overrides: Any) -> NiahConfig:
        """The config of preset ``name`` with ``overrides`` applied."""
        return cls(**{**preset_values(name), **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # The defaults of NiahConfig: 4 lengths (1000, 3000, 5000, 7000) x 5 depths x 2 modes on CPU.
    "quick": {},
    # METHOD §5: 20 lengths round(linspace(200, max, 20)) x 20 depths round(linspace(0, 100, 20)).
    "paper": {
        "min_length": 200, "max_length": 4000, "num_lengths": 20, "num_depths": 20,
        "modes": "raw,chat,chat+prefix,chat+prefix+steer", "alpha": 0.95, "max_new_tokens": 100,
        "haystack": "paul_graham", "out": "runs/niah-paper",
    },
}


def preset_values(name: str) -> dict[str, Any]:
    """The option values of preset ``name`` (on top of the :class:`NiahConfig` defaults)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown NIH preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
