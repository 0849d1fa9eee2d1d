"""Attention backend shared by interventions: per-key bias math, registered functions, head specs.

* :mod:`.functional` — pure tensor math (fused SDPA with a per-key bias channel, decode and eager);
* :mod:`.backend` — the ``ctxaware_sdpa`` / ``ctxaware_eager`` implementations registered with
  transformers and the registry of active bias plans;
* :mod:`.heads` — parsing and resolving layer/head selections (``"0-11"``, ``"3:0,5;7:all"``).
"""

from __future__ import annotations

from .heads import HEADS_HELP, format_heads, parse_heads, resolve_heads

__all__ = ["HEADS_HELP", "format_heads", "parse_heads", "resolve_heads"]
