"""``steer(model, config, emphasis)``: attention steering for everything run inside the block.

Inside the ``with`` block every forward pass of ``model`` — a plain call, ``generate()`` with all
its KV-cache decoding steps, a left-padded batch — adds ``log(alpha)`` to the pre-softmax scores of
the prompt keys outside the emphasised spans, in the selected (layer, query head) pairs. It works by
switching the model's (and its sub-configs') ``_attn_implementation`` to the ctxaware wrapper of
the current one (``sdpa`` -> ``ctxaware_sdpa``, ``eager`` -> ``ctxaware_eager``, see
:mod:`ctxaware.attention.backend`) and registering the bias plan under the model's configs; both
are undone in ``finally``. Parameters, modules and the model's other state are never touched.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ..attention import backend
from ..errors import ConfigError, SteeringError
from .config import SteeringConfig

logger = logging.getLogger(__name__)


def _rows_from_chat(chat: Any, roles: tuple[str, ...]) -> list[bool]:
    n = len(chat.input_ids)
    row = [False] * n
    spans = list(getattr(chat, "spans", []) or [])
    if roles == ("last_user",):
        users = [s for s in spans if s.role == "user"]
        chosen = users[-1:]
    else:
        chosen = [s for s in spans if s.role in roles]
        if not spans and getattr(chat, "roles", None):
            return [r in roles for r in chat.roles]
    for s in chosen:
        for i in range(max(0, s.start), min(n, s.end)):
            row[i] = True
    return row


def emphasis_mask(emphasis: Any, roles: Sequence[str] = ("user",)) -> torch.Tensor:
    """Bool ``(B, P)`` emphasis aligned to the left-padded prompt (True = keep at full weight).

    ``emphasis``: a RenderedChat, a list of them (rows of a left-padded batch), or a bool tensor /
    nested list ``(B, P)`` (or ``(P,)``). Raises :class:`SteeringError` when a row emphasises nothing.
    """
    roles = tuple(roles)
    what = "+".join(roles)
    if emphasis is None:
        raise SteeringError("steering needs the emphasised tokens: pass the RenderedChat(s) of the prompt "
                            "or a bool mask (batch, prompt_len)")
    if hasattr(emphasis, "input_ids") and hasattr(emphasis, "spans"):
        emphasis = [emphasis]
    if isinstance(emphasis, (list, tuple)) and emphasis and hasattr(emphasis[0], "input_ids"):
        rows = [_rows_from_chat(chat, roles) for chat in emphasis]
        width = max(len(r) for r in rows)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                mask[i, width - len(r):] = torch.tensor(r, dtype=torch.bool)
        source = f"the {what} span(s) of the prompt"
    else:
        try:
            mask = torch.as_tensor(emphasis)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SteeringError(f"emphasis must be RenderedChat(s) or a bool mask, got {type(emphasis).__name__}") from exc
        if mask.dtype != torch.bool:
            raise SteeringError(f"an emphasis mask must be boolean (True = emphasised key), got {mask.dtype}")
        if mask.dim() == 1:
            mask = mask[None]
        if mask.dim() != 2:
            raise SteeringError(f"an emphasis mask must be (batch, prompt_len), got shape {tuple(mask.shape)}")
        source = "the emphasis mask"
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        raise SteeringError("steering got an empty prompt")
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise SteeringError(f"{source} emphasise no token in batch row(s) {empty}: nothing to steer toward "
                            f"(is there a {'user' if roles == ('last_user',) else what} turn with content?)")
    return mask


def build_plan(model: Any, config: SteeringConfig, emphasis: Any) -> backend.KeyBiasPlan | None:
    """Validate everything and build the bias plan; None when steering is the identity."""
    n_layers, n_heads = backend.model_dims(model)
    resolved = config.resolve_heads(n_layers, n_heads)
    mask = emphasis_mask(emphasis, config.emphasis_roles)
    if not config.active or not resolved:
        return None
    multipliers = config.layer_multipliers(list(resolved))
    head_scale = {}
    for layer, heads in resolved.items():
        scale = torch.zeros(n_heads, dtype=torch.float32)
        scale[heads if heads is not None else slice(None)] = multipliers[layer]
        head_scale[layer] = scale
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return backend.KeyBiasPlan(emphasis=mask.to(device), log_alpha=math.log(config.alpha), head_scale=head_scale)


@contextmanager
def steer(model: Any, config: SteeringConfig | None = None, emphasis: Any = None, **overrides: Any
          ) -> Iterator[backend.KeyBiasPlan | None]:
    """Steer ``model``'s attention toward the emphasised prompt tokens inside the block.

    ``config``: a :class:`SteeringConfig` (default: paper defaults), ``overrides`` replace its
    fields (``steer(model, emphasis=chat, alpha=0.5)``). ``emphasis``: the prompt's RenderedChat,
    a list of them in batch order (left-padded batch), or a bool tensor ``(batch, prompt_len)``
    aligned to the padded input. Raises :class:`SteeringError` at entry when a prompt has no
    emphasised token and :class:`ConfigError` for heads the model does not have. With
    ``alpha == 1`` nothing is changed at all. Yields the active plan (None when inactive).
    """
    if config is None:
        config = SteeringConfig(**overrides)
    elif overrides:
        config = config.replace(**overrides)
    elif not isinstance(config, SteeringConfig):
        raise ConfigError(f"config must be a SteeringConfig, got {type(config).__name__}")
    plan = build_plan(model, config, emphasis)
    if plan is None:
        yield None
        return
    backend.register()
    configs = backend.model_configs(model)
    backend.push_plan(configs, plan)
    try:
        with backend.switched_implementation(model, backend.steered_name):
            logger.debug("steering %d layer(s) with alpha=%s", len(plan.head_scale), config.alpha)
            yield plan
    finally:
        backend.pop_plan(configs, plan)
