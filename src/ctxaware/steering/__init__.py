"""Post-hoc attention steering toward the user's turn (METHOD §2), exact under sdpa and eager.

* :class:`SteeringConfig` — alpha, which (layer, head) pairs, which roles to emphasise, compounding;
* :func:`steer` — context manager: every forward pass inside it (prefill, each KV-cache decoding
  step, left-padded batches) adds ``log(alpha)`` to the scores of non-emphasised prompt keys;
* :func:`steer_rows` — the same with one config (or None) per batch row, for mixed batches;
* :func:`emphasis_mask` — the bool ``(batch, prompt_len)`` emphasis of rendered prompts;
* :class:`SteeredModel` — ``.chat()`` / ``.chat_batch()`` / ``.generate_rendered()``, greedy;
* :func:`load_steering_file` — a SteeringConfig from a steering file (``ctxaware calibrate``'s output).

See ``docs/steering.md`` for how it works and what it costs.
"""

from __future__ import annotations

from .config import SteeringConfig
from .context import emphasis_mask, steer, steer_rows
from .file import load_steering_file, read_steering_file, write_steering_file
from .model import SteeredModel

__all__ = ["SteeredModel", "SteeringConfig", "emphasis_mask", "load_steering_file", "read_steering_file", "steer",
           "steer_rows", "write_steering_file"]
