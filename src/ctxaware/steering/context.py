"""``steer(model, config, emphasis)`` and ``steer_rows(model, configs, emphasis)``: attention steering
for everything run inside the block (one config for the batch, or one per batch row).

Inside the ``with`` block every forward pass of ``model`` — a plain call, ``generate()`` with all
its KV-cache decoding steps, a left-padded batch — adds ``log(alpha)`` to the pre-softmax scores of
the prompt keys outside the emphasised spans, in the selected (layer, query head) pairs. It works by
switching the model's (and its sub-configs') ``_attn_implementation`` to the ctxaware wrapper of
the current one (``sdpa`` -> ``ctxaware_sdpa``, ``eager`` -> ``ctxaware_eager``, see
:mod:`ctxaware.attention.backend`) and registering the bias plan under the model's configs in the
current thread's context; both are undone in ``finally``. Parameters, modules and the model's
other state are never touched. Models whose attention is outside transformers' registry are
refused, and a steered layer the first forward pass never reached is an error.
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


def _chats_mask(chats: Sequence[Any], roles: tuple[str, ...]) -> torch.Tensor:
    """Bool ``(B, P)`` emphasis of rendered prompts, each row at the end as in a left-padded batch."""
    rows = [_rows_from_chat(chat, roles) for chat in chats]
    width = max(len(r) for r in rows)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            mask[i, width - len(r):] = torch.tensor(r, dtype=torch.bool)
    return mask


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
        mask = _chats_mask(emphasis, roles)
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


def _row_masks(emphasis: Any, roles_per_row: list[tuple[str, ...]], required: list[bool]) -> torch.Tensor:
    """Bool ``(B, P)`` emphasis with each row's own roles; only ``required`` rows must emphasise something."""
    if isinstance(emphasis, (list, tuple)) and emphasis and hasattr(emphasis[0], "input_ids") \
            and len(set(roles_per_row)) > 1:
        if len(emphasis) != len(roles_per_row):
            raise SteeringError(f"steer_rows got {len(roles_per_row)} config(s) but {len(emphasis)} prompt(s); "
                                "pass one config (or None) per batch row")
        rows = [_rows_from_chat(chat, roles) for chat, roles in zip(emphasis, roles_per_row)]
        width = max(len(r) for r in rows)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                mask[i, width - len(r):] = torch.tensor(r, dtype=torch.bool)
        if mask.shape[1] == 0:
            raise SteeringError("steering got an empty prompt")
    else:
        roles = next((r for r, req in zip(roles_per_row, required) if req), roles_per_row[0])
        try:
            mask = emphasis_mask(emphasis, roles)
        except SteeringError as exc:
            if all(required) or "emphasise no token" not in str(exc):
                raise
            mask = _lenient_mask(emphasis, roles)
    if mask.shape[0] != len(roles_per_row):
        raise SteeringError(f"steer_rows got {len(roles_per_row)} config(s) but an emphasis of {mask.shape[0]} "
                            "row(s); pass one config (or None) per batch row")
    empty = [i for i in (~mask.any(dim=1)).nonzero().flatten().tolist() if required[i]]
    if empty:
        raise SteeringError(f"the emphasis of steered batch row(s) {empty} covers no token: nothing to steer toward "
                            "(is there a user turn with content?)")
    return mask


def _lenient_mask(emphasis: Any, roles: tuple[str, ...]) -> torch.Tensor:
    """:func:`emphasis_mask` without the empty-row check (for batches whose empty rows are unsteered)."""
    if hasattr(emphasis, "input_ids"):
        emphasis = [emphasis]
    if isinstance(emphasis, (list, tuple)) and emphasis and hasattr(emphasis[0], "input_ids"):
        return _chats_mask(emphasis, roles)
    mask = torch.as_tensor(emphasis)
    return mask[None] if mask.dim() == 1 else mask


def _check_config(config: Any) -> SteeringConfig | None:
    if config is None or isinstance(config, SteeringConfig):
        return config
    raise ConfigError(f"each steering config must be a SteeringConfig or None, got {type(config).__name__}")


def build_plan(model: Any, configs: Sequence[SteeringConfig | None] | SteeringConfig, emphasis: Any
               ) -> backend.KeyBiasPlan | None:
    """Validate everything and build the bias plan of a batch (one config or None per row, or one
    config for every row); None when steering is the identity for every row."""
    n_layers, n_heads = backend.model_dims(model)
    if isinstance(configs, SteeringConfig):
        mask = emphasis_mask(emphasis, configs.emphasis_roles)
        configs = [configs] * mask.shape[0]
    else:
        configs = [_check_config(c) for c in configs]
        if not configs:
            raise SteeringError("steer_rows needs one config (or None) per batch row, got an empty list")
        roles = [c.emphasis_roles if c is not None else ("user",) for c in configs]
        mask = _row_masks(emphasis, roles, [c is not None for c in configs])
    resolved = [c.resolve_heads(n_layers, n_heads) if c is not None else {} for c in configs]
    active = [c is not None and c.active and bool(r) for c, r in zip(configs, resolved)]
    if not any(active):
        return None
    rows = len(configs)
    log_alpha = torch.zeros(rows, dtype=torch.float64)
    share = torch.full((rows,), math.nan, dtype=torch.float64)
    head_scale: dict[int, torch.Tensor] = {}
    for b, (cfg, heads, on) in enumerate(zip(configs, resolved, active)):
        if not on:
            continue
        if cfg.rule == "share":
            share[b] = cfg.share
            multipliers = {layer: 1.0 for layer in heads}
        else:
            log_alpha[b] = math.log(cfg.alpha)
            multipliers = cfg.layer_multipliers(list(heads))
        for layer, hs in heads.items():
            if layer not in head_scale:
                head_scale[layer] = torch.zeros(rows, n_heads, dtype=torch.float32)
            head_scale[layer][b, hs if hs is not None else slice(None)] = multipliers[layer]
    has_share = bool((~torch.isnan(share)).any())
    return backend.KeyBiasPlan(emphasis=mask, log_alpha=log_alpha, head_scale=dict(sorted(head_scale.items())),
                               share=share if has_share else None)


def _refuse_unreachable(model: Any) -> None:
    if not backend.supports_registry(model):
        name = type(model).__name__
        raise SteeringError(f"{name} does not route its attention through transformers' attention registry, so "
                            f"steering cannot reach it; use a model class that does (Llama, Mistral, Qwen2, "
                            f"Gemma, Phi-3, GPT-2, ...) or convert the checkpoint to one")


def _reach_check(model: Any, plan: backend.KeyBiasPlan) -> Any:
    """A forward hook that, after the first forward pass run under ``plan``, raises when a steered
    layer was never reached by the registered attention functions."""
    state = {"done": False}

    def hook(module: Any, args: Any, output: Any) -> None:
        if state["done"] or backend.plan_for_config(getattr(model, "config", None)) is not plan:
            return
        state["done"] = True
        missed = sorted(set(plan.head_scale) - plan.reached)
        if missed:
            raise SteeringError(f"{type(model).__name__}: steered layer(s) {missed} never called the registered "
                                "attention function, so steering would be a silent no-op there; load the model "
                                "with attn_implementation='sdpa' or 'eager', or steer only the layers it reaches")

    return model.register_forward_hook(hook)


@contextmanager
def steer_rows(model: Any, configs: Sequence[SteeringConfig | None], emphasis: Any
               ) -> Iterator[backend.KeyBiasPlan | None]:
    """Steer each row of a batch with its own config inside the block (``None`` = unsteered row).

    ``configs``: one :class:`SteeringConfig` or None per batch row, in batch order: each row gets
    its own ``log α`` (or target share), its own (layer, head) selection and its own emphasised
    roles; rows that are None or have ``alpha == 1`` get exactly zero bias. ``emphasis``: the
    rows' RenderedChats (left-padded batch) or a bool ``(batch, prompt_len)`` mask. Plans are per
    thread/context, so concurrent blocks on one model never see each other's rows. Yields the
    plan (None when no row is steered).
    """
    plan = build_plan(model, list(configs), emphasis)
    with _activated(model, plan):
        yield plan


@contextmanager
def _activated(model: Any, plan: backend.KeyBiasPlan | None) -> Iterator[None]:
    if plan is None:
        yield
        return
    _refuse_unreachable(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    plan.emphasis = plan.emphasis.to(device)
    backend.register()
    configs = backend.model_configs(model)
    backend.push_plan(configs, plan)
    handle = _reach_check(model, plan)
    try:
        with backend.shared_switch(model, backend.steered_name, configs=configs):
            logger.debug("steering %d layer(s) of %d row(s)", len(plan.head_scale), plan.rows)
            yield
    finally:
        handle.remove()
        backend.pop_plan(configs, plan)


@contextmanager
def steer(model: Any, config: SteeringConfig | None = None, emphasis: Any = None, **overrides: Any
          ) -> Iterator[backend.KeyBiasPlan | None]:
    """Steer ``model``'s attention toward the emphasised prompt tokens inside the block.

    ``config``: a :class:`SteeringConfig` (default: paper defaults), ``overrides`` replace its
    fields (``steer(model, emphasis=chat, alpha=0.5)``). ``emphasis``: the prompt's RenderedChat,
    a list of them in batch order (left-padded batch), or a bool tensor ``(batch, prompt_len)``
    aligned to the padded input. Raises :class:`SteeringError` at entry when a prompt has no
    emphasised token or the model's attention is outside transformers' registry, and at the end of
    the first forward pass when a steered layer was never reached; :class:`ConfigError` for heads
    the model does not have. With ``alpha == 1`` nothing is changed at all. The same config for
    every row of :func:`steer_rows`. Yields the active plan (None when inactive).
    """
    if config is None:
        config = SteeringConfig(**overrides)
    elif not isinstance(config, SteeringConfig):
        raise ConfigError(f"config must be a SteeringConfig, got {type(config).__name__}")
    elif overrides:
        config = config.replace(**overrides)
    plan = build_plan(model, config, emphasis)
    with _activated(model, plan):
        yield plan
