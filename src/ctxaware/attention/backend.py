"""Attention functions registered with transformers that add the active plan's bias.

Two implementations are registered (on first use) in transformers' ``AttentionInterface``, each
with the mask function of the implementation it wraps registered under the same name in
``AttentionMaskInterface`` (without it the attention function would silently get no mask):

* ``"ctxaware_sdpa"`` wraps ``sdpa`` (mask: ``sdpa_mask``);
* ``"ctxaware_eager"`` wraps ``eager`` (mask: ``eager_mask``);
* ``"ctxaware_flex"`` wraps ``flex_attention`` (mask: ``flex_attention_mask``; :mod:`.flex_backend`).

The model itself is never modified beyond its configs' ``_attn_implementation``, switched by
:func:`shared_switch` (reference-counted, so two threads steering one model do not restore it
under each other). What to add is looked up per forward call in the current context's plans
(:mod:`.plan`, a ``ContextVar``): a layer the plan does not steer, or any layer when this
context has no plan, calls the wrapped implementation unchanged, so its output is bit-for-bit the
model's own. Each layer a plan is applied to is noted in ``plan.reached``, so ``steer()`` can
tell a steered layer that was never reached (an error, never a silent no-op).

Sliding-window layers: once a sequence outgrows the window, their cache keeps only the last keys,
so key ``j`` of such a layer is not prompt position ``j``. The registered mask functions record
the ``kv_offset`` (absolute position of the first key) transformers computes for each window size
in the current context's plan, and the attention functions shift the key bias by it.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..errors import ConfigError, SteeringError
from . import functional as AF
from . import share as AS
from . import thin as TH
from .plan import KeyBiasPlan, active_plans, plan_for_config, pop_plan, push_plan

__all__ = ["EAGER_NAME", "FLEX_NAME", "SDPA_NAME", "KeyBiasPlan", "active_plans", "eager_attention", "model_configs",
           "model_dims", "plan_for_config", "pop_plan", "push_plan", "register", "sdpa_attention",
           "shared_switch", "steered_name", "supports_registry", "switched_implementation"]

logger = logging.getLogger(__name__)

SDPA_NAME = "ctxaware_sdpa"
EAGER_NAME = "ctxaware_eager"
FLEX_NAME = "ctxaware_flex"
WRAPPED = {SDPA_NAME: "sdpa", EAGER_NAME: "eager", FLEX_NAME: "flex_attention"}

_LOCK = threading.Lock()
_SWITCHED: dict[int, list] = {}
_REGISTERED = False


def _plan_for(module: Any) -> KeyBiasPlan | None:
    return plan_for_config(getattr(module, "config", None))


_EAGER_CACHE: dict[type, Callable] = {}


def _model_eager(module: Any) -> Callable:
    """The eager attention function of the module's own modeling file (generic one as fallback)."""
    cls = type(module)
    fn = _EAGER_CACHE.get(cls)
    if fn is None:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None) or _generic_eager
        _EAGER_CACHE[cls] = fn
    return fn


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return AF.eager_bias(query, key, value, attention_mask, scaling=scaling or query.shape[-1] ** -0.5, add=None,
                         dropout=dropout, training=getattr(module, "training", False), softcap=kwargs.get("softcap"))


def _unsupported(module: Any, kwargs: dict) -> None:
    if getattr(module, "sinks", None) is not None:
        raise SteeringError(f"{type(module).__name__} uses attention sinks, which steering does not support")
    if kwargs.get("position_bias") is not None:
        raise SteeringError(f"{type(module).__name__} uses a position bias, which steering does not support")


def _layer_plan(module: Any, query: torch.Tensor) -> tuple[KeyBiasPlan | None, torch.Tensor | None]:
    plan = _plan_for(module)
    if plan is None:
        return None, None
    layer = getattr(module, "layer_idx", None)
    head_scale = plan.scale_for(layer, query.shape[0], query.device)
    if head_scale is not None:
        plan.reached.add(layer)
    return plan, head_scale


def _coefficient(plan: KeyBiasPlan, head_scale: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """float64 ``(B, H)`` fixed-α coefficient ``head_scale[b, h] · log α_b`` on ``query.device``."""
    return head_scale.double() * plan.row_log_alpha(query.shape[0], query.device)[:, None]


def sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                   **kwargs):
    """``ctxaware_sdpa``: transformers' SDPA attention plus the current plan's bias."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan, head_scale = _layer_plan(module, query)
    if head_scale is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    _unsupported(module, kwargs)
    if kwargs.get("softcap") is not None:
        raise SteeringError("sdpa attention does not support softcap; load the model with attn_implementation='eager'")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, kv_length, device = query.shape[0], key.shape[2], query.device
    offset = plan.kv_offset(kwargs.get("sliding_window"))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    share = plan.row_share(batch, device)
    mask_dtype = AF.decode_mask_dtype(query) if query.shape[2] == 1 else None
    if mask_dtype is not None and share is None and not offset:  # a decoding step: the layer's bias buffer
        add = plan.decode_bias(module.layer_idx, kv_length, batch, device, mask_dtype, lambda n: AF.additive_bias(
            _coefficient(plan, head_scale, query), plan.down(n, batch, device)))
        out = AF.sdpa_decode_mask(query, key, value, attention_mask, scaling=scaling, add=add, dropout=dropout)
        return out, None
    coef = _coefficient(plan, head_scale, query)
    down = plan.down(kv_length, batch, device, offset)
    if share is not None:
        emph = plan.emphasised(kv_length, batch, device, offset)
        shares = AS.shares_sdpa(query, key, attention_mask, scaling=scaling, emphasised=emph, down=down,
                                is_causal=causal)
        coef = coef[..., None] + AS.share_coef(shares, share, head_scale > 0, plan.share_floor)
    if mask_dtype is not None:
        add = AF.additive_bias(coef, down)
        out = AF.sdpa_decode_mask(query, key, value, attention_mask, scaling=scaling, add=add, dropout=dropout)
    else:
        out = None
        # the down-key index and the gate's numbers come from the plan: built once per forward pass
        index = plan.down_index(kv_length, batch, device, offset) if share is None and attention_mask is None else None
        if index is not None and TH.wanted(query, key, value, attention_mask, coef=coef, down=down, is_causal=causal,
                                           dropout=dropout, coef_range=plan.coef_range(module.layer_idx),
                                           n_down=index[2]):
            out = TH.attention(query, key, value, scaling=scaling, coef=coef, down=down, index=index)
        if out is None:
            out = AF.sdpa_key_bias(query, key, value, attention_mask, scaling=scaling, coef=coef, down=down,
                                   is_causal=causal, dropout=dropout)
    return out, None


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``ctxaware_eager``: the model's eager attention plus the current plan's bias."""
    plan, head_scale = _layer_plan(module, query)
    if head_scale is None:
        return _model_eager(module)(module, query, key, value, attention_mask, scaling=scaling,
                                    dropout=dropout, **kwargs)
    _unsupported(module, kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, kv_length, device = query.shape[0], key.shape[2], query.device
    offset = plan.kv_offset(kwargs.get("sliding_window"))
    down = plan.down(kv_length, batch, device, offset)
    scores = AF.eager_scores(query, key, attention_mask, scaling=scaling, softcap=kwargs.get("softcap"))
    add = AF.additive_bias(_coefficient(plan, head_scale, query), down)
    share = plan.row_share(batch, device)
    if share is not None:
        emph = plan.emphasised(kv_length, batch, device, offset)
        shares = AS.shares_eager(scores, emph, down)
        add = add + AF.additive_bias(AS.share_coef(shares, share, head_scale > 0, plan.share_floor), down)
    return AF.eager_bias(query, key, value, attention_mask, scaling=scaling, add=add, scores=scores,
                         dropout=dropout, training=getattr(module, "training", False))


def _recording(mask_fn: Callable) -> Callable:
    """A mask function that first notes the key offset of sliding-window masks in the current plan."""

    def mask(*args: Any, **kwargs: Any) -> Any:
        local_size, config = kwargs.get("local_size"), kwargs.get("config")
        if local_size and config is not None:
            plan = plan_for_config(config)
            if plan is not None:
                plan.kv_offsets[int(local_size)] = int(kwargs.get("kv_offset", 0))
        return mask_fn(*args, **kwargs)

    mask.__name__ = mask.__qualname__ = f"recording_{mask_fn.__name__}"
    mask.__doc__ = mask_fn.__doc__
    return mask


def model_configs(model: Any) -> list[Any]:
    """Every config object the model's modules (and nested sub-configs) hold, once each."""
    seen: dict[int, Any] = {}

    def add(cfg: Any) -> None:
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            return
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            add(getattr(cfg, key, None))

    add(getattr(model, "config", None))
    for module in model.modules():
        add(getattr(module, "config", None))
    return list(seen.values())


def get_impl(cfg: Any) -> Any:
    """The attention implementation a config holds (without resolving defaults)."""
    return cfg.__dict__.get("_attn_implementation_internal", cfg._attn_implementation)


def set_impl(cfg: Any, value: Any) -> None:
    """Set one config's attention implementation, without cascading to its sub-configs."""
    if "_attn_implementation_internal" in cfg.__dict__:
        cfg._attn_implementation_internal = value
    else:  # pragma: no cover - configs without the internal attribute
        cfg._attn_implementation = value


@contextmanager
def switched_implementation(model: Any, name_for: Callable[[Any], str]) -> Iterator[None]:
    """Set each config of ``model`` to ``name_for(its current implementation)``; restore in ``finally``."""
    saved = [(cfg, get_impl(cfg)) for cfg in model_configs(model)]
    try:
        for cfg, impl in saved:
            set_impl(cfg, name_for(impl))
        yield
    finally:
        for cfg, impl in saved:
            set_impl(cfg, impl)


@contextmanager
def shared_switch(model: Any, name_for: Callable[[Any], str] | None = None, configs: list[Any] | None = None
                  ) -> Iterator[None]:
    """Switch ``model`` to the ctxaware implementations while any steering block on it is open.

    Reference-counted per model: the first block switches every config (``name_for``, default
    :func:`steered_name`), the last one to close restores them, whichever thread it runs in.
    ``configs``: :func:`model_configs` of ``model`` when the caller has it already.
    """
    name_for = name_for or steered_name
    key = id(model)
    with _LOCK:
        entry = _SWITCHED.get(key)
        if entry is None:
            saved = [(cfg, get_impl(cfg)) for cfg in (model_configs(model) if configs is None else configs)]
            for cfg, impl in saved:
                set_impl(cfg, name_for(impl))
            entry = _SWITCHED[key] = [0, saved]
        entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                for cfg, impl in entry[1]:
                    set_impl(cfg, impl)
                _SWITCHED.pop(key, None)


def supports_registry(model: Any) -> bool:
    """Whether ``model``'s attention goes through transformers' attention registry (so steering reaches it)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def model_dims(model: Any) -> tuple[int, int]:
    """``(num_hidden_layers, num_attention_heads)`` of the model's text decoder."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    except AttributeError as exc:
        raise ConfigError(f"{type(model).__name__}: its config has no layer/head counts") from exc


def register() -> None:
    """Register both attention functions and their mask functions with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, flex_attention_mask, sdpa_mask

    from .flex_backend import flex_attention

    AttentionInterface.register(SDPA_NAME, sdpa_attention)
    AttentionInterface.register(EAGER_NAME, eager_attention)
    AttentionInterface.register(FLEX_NAME, flex_attention)
    AttentionMaskInterface.register(SDPA_NAME, _recording(sdpa_mask))
    AttentionMaskInterface.register(EAGER_NAME, _recording(eager_mask))
    AttentionMaskInterface.register(FLEX_NAME, _recording(flex_attention_mask))
    _REGISTERED = True


def steered_name(current: str | None) -> str:
    """The ctxaware implementation wrapping ``current`` (``sdpa`` for anything but eager and flex)."""
    if current in WRAPPED:
        return current  # type: ignore[return-value]
    if current == "eager":
        return EAGER_NAME
    if current == "flex_attention":
        return FLEX_NAME
    if current not in (None, "sdpa"):
        logger.warning("attention implementation %r is replaced by %s while steering (same math, "
                       "different kernel)", current, SDPA_NAME)
    return SDPA_NAME
