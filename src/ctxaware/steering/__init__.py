"""Post-hoc attention steering toward the user's turn (METHOD §2), exact under sdpa and eager.

* :class:`SteeringConfig` — alpha, which (layer, head) pairs, which roles to emphasise, compounding;
* :func:`steer` — context manager: every forward pass inside it (prefill, each KV-cache decoding
  step, left-padded batches) adds ``log(alpha)`` to the scores of non-emphasised prompt keys;
* :func:`emphasis_mask` — the bool ``(batch, prompt_len)`` emphasis of rendered prompts;
* :class:`SteeredModel` — ``.chat()`` / ``.chat_batch()`` / ``.generate_rendered()``, greedy.

See ``docs/steering.md`` for how it works and what it costs.
"""

from __future__ import annotations

from .config import SteeringConfig
from .context import emphasis_mask, steer
from .model import SteeredModel

__all__ = ["SteeredModel", "SteeringConfig", "emphasis_mask", "steer"]
