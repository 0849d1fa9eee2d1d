"""``ScoringConfig``: the options of the context-dependency score (importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigMixin, field
from ..errors import ConfigError


@dataclass
class ScoringConfig(ConfigMixin):
    """Options of the context-dependency score."""

    layer: int | None = field(None, help="layer whose attention is used (default: int(num_layers*15/22), "
                                         "the paper's 15 of 22)", metavar="L")
    head_reduction: str = field("max", help="reduction over heads per response token", choices=("max", "mean"))
    max_length: int = field(2047, help="score only turns that fit in this many tokens (reference: 2047)")
    batch_size: int = field(8, help="conversations per forward pass (length-bucketed)")
    insert_empty_system: bool = field(True, help="insert an empty system message when there is none (METHOD §3)")
    exclude_newlines: bool = field(True, help="leave bare-newline tokens out of the user/system keys (reference)")

    def __post_init__(self) -> None:
        if self.head_reduction not in ("max", "mean"):
            raise ConfigError(f"head_reduction must be 'max' or 'mean', got {self.head_reduction!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
