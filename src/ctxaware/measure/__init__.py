"""Attention observation: attention mass from chosen queries onto roles or key sets, per layer and head.

``measure_attention(model, rendered, queries=..., layers=..., heads=...)`` gives the attention
mass per role without materialising attention matrices; ``observe_mass`` is the lower-level
mechanism (arbitrary key weights) that scoring also uses; ``render_plain`` renders a
conversation without its chat template.
"""

from __future__ import annotations

from .attention import AttentionResult, measure_attention, role_shares
from .mechanism import observe_mass
from .plain import PLAIN_SEPARATOR, render_plain

__all__ = ["AttentionResult", "measure_attention", "observe_mass", "render_plain", "role_shares", "PLAIN_SEPARATOR"]
