"""``SteeringConfig``: how strongly, where, and toward which tokens attention is steered.

Fields carry CLI help (``ctxaware chat --alpha 0.9 --heads 0-11``) and the config round-trips to
YAML/JSON (``SteeringConfig.from_file("steer.yaml")``). Values are checked in ``__post_init__``;
head indices are checked against a model by :meth:`SteeringConfig.resolve_heads`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..attention.heads import HEADS_HELP, parse_heads, resolve_heads
from ..config import ConfigMixin, field
from ..errors import ConfigError

MESSAGE_ROLES = ("system", "user", "assistant")
EMPHASIS_HELP = ('tokens kept at full weight: "user" (content of every user turn), "last_user", or roles '
                 'joined by "+" such as "system+user"; every other prompt token is down-weighted')
COMPOUNDING = ("none", "reference")
RULES = ("alpha", "share")


def parse_emphasis(value: str) -> tuple[str, ...]:
    """``"system+user"`` -> ``("system", "user")``; ``"last_user"`` stays a single item."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"emphasis must be a non-empty string, got {value!r} ({EMPHASIS_HELP})")
    text = value.strip().lower()
    if text == "last_user":
        return ("last_user",)
    parts = tuple(p.strip() for p in text.split("+"))
    bad = [p for p in parts if p not in MESSAGE_ROLES]
    if bad:
        raise ConfigError(f"emphasis {value!r}: unknown role {bad[0]!r}; use {EMPHASIS_HELP}")
    return tuple(dict.fromkeys(parts))


@dataclass
class SteeringConfig(ConfigMixin):
    """Post-hoc attention steering (METHOD §2): scale the attention paid to non-emphasised prompt
    tokens by ``alpha`` in the selected heads and renormalise — or, under ``rule="share"``, scale it
    per query just enough that the emphasised tokens get at least ``share`` of the attention."""

    alpha: float = field(0.95, help="weight kept on prompt tokens outside the emphasised spans, in (0, 1]; "
                         "1 = no steering, smaller = steer harder", metavar="A")
    heads: Any = field("all", help=HEADS_HELP, metavar="SPEC")
    emphasis: str = field("user", help=EMPHASIS_HELP, metavar="ROLES")
    compounding: str = field("none", help='"none": one log(alpha) per steered layer (the paper\'s math); '
                             '"reference": the i-th steered layer applies alpha^(i+1), as the authors\' code does',
                             choices=COMPOUNDING)
    rule: str = field("alpha", help='"alpha": fixed weight alpha on the other prompt keys; "share": per query and head, '
                      'the smallest down-weighting that gives the emphasised keys at least --share of the attention '
                      '(alpha is then ignored)', choices=RULES)
    share: float = field(0.5, help='target attention share of the emphasised keys under rule "share", in (0, 1)',
                         metavar="S")

    def __post_init__(self) -> None:
        try:
            alpha = float(self.alpha)
        except (TypeError, ValueError):
            raise ConfigError(f"alpha must be a number in (0, 1], got {self.alpha!r}") from None
        if isinstance(self.alpha, bool) or not math.isfinite(alpha) or not 0.0 < alpha <= 1.0:
            raise ConfigError(f"alpha must lie in (0, 1] (1 = no steering), got {self.alpha!r}")
        self.alpha = alpha
        if isinstance(self.heads, tuple):
            self.heads = list(self.heads)
        parse_heads(self.heads)
        parse_emphasis(self.emphasis)
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        try:
            share = float(self.share)
        except (TypeError, ValueError):
            raise ConfigError(f"share must be a number in (0, 1), got {self.share!r}") from None
        if isinstance(self.share, bool) or not math.isfinite(share) or not 0.0 < share < 1.0:
            raise ConfigError(f"share must lie strictly between 0 and 1 (e.g. 0.5), got {self.share!r}")
        self.share = share
        if self.compounding not in COMPOUNDING:
            raise ConfigError(f"compounding must be one of {', '.join(COMPOUNDING)}, got {self.compounding!r}")

    @property
    def active(self) -> bool:
        """False when steering is the identity and is skipped (``alpha == 1`` under the fixed-α rule)."""
        return self.rule == "share" or self.alpha < 1.0

    def resolve_heads(self, num_layers: int, num_heads: int) -> dict[int, list[int] | None]:
        """``{layer: None (every head) | [query heads]}`` for a model with these counts."""
        return resolve_heads(self.heads, num_layers, num_heads)

    def layer_multipliers(self, layers: list[int]) -> dict[int, float]:
        """How many ``log(alpha)`` each steered layer adds: 1, or ``i + 1`` under reference compounding."""
        ordered = sorted(layers)
        if self.compounding == "reference":
            return {layer: float(i + 1) for i, layer in enumerate(ordered)}
        return {layer: 1.0 for layer in ordered}

    @property
    def emphasis_roles(self) -> tuple[str, ...]:
        return parse_emphasis(self.emphasis)
