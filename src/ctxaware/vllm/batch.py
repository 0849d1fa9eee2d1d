"""Which request of vLLM's running batch is steered, and how: a logits processor that only watches.

vLLM v1 tells every logits processor, before each forward pass, which requests joined the
persistent batch (their index, ``SamplingParams`` and prompt token ids), left it, or moved within
it (``BatchUpdate``); the batch index is the order of the requests in the attention metadata of
that forward. :class:`SteeringTracker` is registered through the ``vllm.logits_processors`` entry
point (a public plugin group, no patch), never changes a logit, and keeps a module-level map
``batch index -> RequestSteering`` that the attention backend (:mod:`.cpu_backend`) reads.

:meth:`SteeringTracker.validate_params` runs in the API server / ``LLM`` front end for every
request: malformed ``ctxaware_*`` extra args, or steering while the attention override is not
active in this vLLM, are refused there (HTTP 400), never applied silently.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CtxawareError
from . import request as RQ

logger = logging.getLogger(__name__)

_BATCH: dict[int, "RequestSteering"] = {}
_STATE = {"version": 0}


@dataclass
class RequestSteering:
    """One steered request, resolved against the model: ``coef`` (num_layers, num_heads) bias added to
    the down-weighted keys of each (layer, query head); ``down`` (prompt_len,) bool."""

    steering: RQ.WorkerSteering
    coef: torch.Tensor
    down: torch.Tensor
    layers: frozenset[int]
    serial: int = field(default_factory=itertools.count().__next__)  # unique per admission into the batch


def current_batch() -> dict[int, RequestSteering]:
    """The steered requests of the running batch, by batch index (read by the attention backend)."""
    return _BATCH


def batch_version() -> int:
    return _STATE["version"]


def resolve(steering: RQ.WorkerSteering, num_layers: int, num_heads: int) -> RequestSteering:
    """Per-(layer, head) coefficients and the down-weighted prompt keys of one request."""
    config = steering.config()
    heads = config.resolve_heads(num_layers, num_heads)
    mult = config.layer_multipliers(sorted(heads))
    coef = torch.zeros(num_layers, num_heads, dtype=torch.float32)
    log_alpha = math.log(steering.alpha)
    for layer, hs in heads.items():
        if hs is None:
            coef[layer] = log_alpha * mult[layer]
        else:
            coef[layer, hs] = log_alpha * mult[layer]
    down = torch.ones(steering.prompt_len, dtype=torch.bool)
    for a, b in zip(steering.spans[0::2], steering.spans[1::2]):
        down[a:b] = False
    return RequestSteering(steering, coef, down, frozenset(heads))


def _model_counts(vllm_config: Any) -> tuple[int, int]:
    text = vllm_config.model_config.hf_text_config
    return int(text.num_hidden_layers), int(text.num_attention_heads)


def _tracker_class() -> type:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class SteeringTracker(LogitsProcessor):
        """Tracks the steered requests of the batch; leaves logits untouched."""

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            try:
                steering = RQ.read_extra_args(getattr(sampling_params, "extra_args", None))
            except CtxawareError as exc:
                raise ValueError(f"ctxaware: {exc}") from None
            if steering is None:
                return
            from .plugin import inactive_reason

            reason = inactive_reason()
            if reason:
                raise ValueError(f"ctxaware: this request is steered but {reason}; it would run unsteered")

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            self.num_layers, self.num_heads = _model_counts(vllm_config)
            _BATCH.clear()
            _STATE["version"] += 1

        def is_argmax_invariant(self) -> bool:
            return True

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            return logits

        def _new(self, params: Any, prompt: list[int] | None, output: list[int]) -> RequestSteering | None:
            steering = RQ.read_extra_args(getattr(params, "extra_args", None))
            if steering is None:
                return None
            if prompt is not None and (len(prompt) != steering.prompt_len
                                       or RQ.prompt_digest(prompt) != steering.prompt_sha):
                raise CtxawareError(f"ctxaware: a steered request's spans were computed on another prompt "
                                    f"({steering.prompt_len} tokens, digest {steering.prompt_sha}) than the one "
                                    f"vLLM runs ({len(prompt)} tokens, digest {RQ.prompt_digest(prompt)}); build "
                                    "extra_args from the exact prompt token ids")
            return resolve(steering, self.num_layers, self.num_heads)

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if process_dict_updates(_BATCH, batch_update, self._new):
                _STATE["version"] += 1

    return SteeringTracker


def __getattr__(name: str) -> Any:
    # built on first access: vLLM's LogitsProcessor base is only importable where vLLM is installed
    if name == "SteeringTracker":
        cls = _tracker_class()
        globals()["SteeringTracker"] = cls
        return cls
    raise AttributeError(name)
