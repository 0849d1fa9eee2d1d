"""Attention backend shared by interventions: per-key bias math, registered functions, head specs.

* :mod:`.functional` — pure tensor math (fused SDPA with padded, hi/lo-split bias channels, decode
  and eager);
* :mod:`.kernels` — ``kernel_for``: which SDPA kernel given shapes/dtypes are eligible for;
* :mod:`.flex` — the same bias through compiled ``flex_attention`` (no ``T × T`` scores) where only
  SDPA's math kernel could take the inputs, and the path switch (``use_path``);
* :mod:`.thin` — steered prefill as the plain kernel's output corrected over the few down-weighted
  keys (:mod:`.lse`: the fused kernels that return their log-sum-exp, per device; :mod:`.fused`:
  the correction, eager or one ``torch.compile``'d pass);
* :mod:`.plan` — bias plans (per batch row) and their per-thread/context registry;
* :mod:`.share` — the target-share rule's per-query bias from indicator-value attention;
* :mod:`.backend` — the ``ctxaware_sdpa`` / ``ctxaware_eager`` implementations registered with
  transformers, the reference-counted implementation switch, the registry check;
  :mod:`.flex_backend` — ``ctxaware_flex``, for models loaded with ``flex_attention``;
* :mod:`.heads` — parsing and resolving layer/head selections (``"0-11"``, ``"3:0,5;7:all"``).
"""

from __future__ import annotations

from .heads import HEADS_HELP, format_heads, parse_heads, resolve_heads

__all__ = ["HEADS_HELP", "format_heads", "parse_heads", "resolve_heads"]
