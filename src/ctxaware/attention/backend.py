"""Attention functions registered with transformers that add a per-key bias while a plan is active.

Two implementations are registered (on first use) in transformers' ``AttentionInterface``, each
with the mask function of the implementation it wraps registered under the same name in
``AttentionMaskInterface`` (without it the attention function would silently get no mask):

* ``"ctxaware_sdpa"`` wraps ``sdpa`` (mask: ``sdpa_mask``);
* ``"ctxaware_eager"`` wraps ``eager`` (mask: ``eager_mask``).

The model itself is never modified beyond its ``config._attn_implementation``: what to add is
looked up in a module-level registry keyed by ``id(module.config)``, where
:func:`push_plan`/:func:`pop_plan` (called by :func:`ctxaware.steering.steer`) put a
:class:`KeyBiasPlan`. Plans stack, so nested contexts work; the innermost wins. A layer the plan
does not steer (or any layer when no plan is active) calls the wrapped implementation unchanged,
so its output is bit-for-bit the model's own.

Sliding-window layers: once a sequence outgrows the window, their cache keeps only the last keys,
so key ``j`` of such a layer is not prompt position ``j``. The registered mask functions record
the ``kv_offset`` (absolute position of the first key) transformers computes for each window size
in the active plan, and the attention functions shift the key bias by it.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from ..errors import ConfigError, SteeringError
from . import functional as AF

logger = logging.getLogger(__name__)

SDPA_NAME = "ctxaware_sdpa"
EAGER_NAME = "ctxaware_eager"
WRAPPED = {SDPA_NAME: "sdpa", EAGER_NAME: "eager"}

_LOCK = threading.Lock()
_PLANS: dict[int, list["KeyBiasPlan"]] = {}
_REGISTERED = False


@dataclass(eq=False)
class KeyBiasPlan:
    """What to add during the forward passes of one model: ``head_scale[layer][h] · bias[b, k]``.

    ``emphasis``: bool ``(B, P)`` aligned to the padded prompt (True = emphasised key);
    ``log_alpha``: bias of the other prompt keys; ``head_scale``: ``{layer: (H,) float32}`` for the
    steered layers only (0 for unsteered heads). Derived tensors are cached per key length.
    """

    emphasis: torch.Tensor
    log_alpha: float
    head_scale: dict[int, torch.Tensor]
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    kv_offsets: dict[int, int] = field(default_factory=dict, repr=False)

    def kv_offset(self, sliding_window: Any) -> int:
        """Absolute position of the first key of a layer with this window (0 for full attention)."""
        if not sliding_window:
            return 0
        return self.kv_offsets.get(int(sliding_window), 0)

    def scale_for(self, layer: int | None, device: torch.device) -> torch.Tensor | None:
        if layer is None or layer not in self.head_scale:
            return None
        key = ("scale", layer, device)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = self.head_scale[layer].to(device)
        return out

    def _check_batch(self, batch: int) -> None:
        b0 = self.emphasis.shape[0]
        if batch != b0 and (b0 == 0 or batch % b0):
            raise SteeringError(f"steering was set up for a batch of {b0} prompt(s) but the model ran a batch "
                                f"of {batch}; pass one emphasis row per batch row")

    def bias(self, kv_length: int, batch: int, device: torch.device, offset: int = 0) -> torch.Tensor:
        """``(batch, kv_length)`` float32 bias of the keys at positions ``offset .. offset+kv_length-1``
        (cached for the latest lengths)."""
        key = ("bias", (kv_length, offset), batch, device)
        out = self._cache.get(key)
        if out is None:
            self._check_batch(batch)
            self._evict("bias", (kv_length, offset))
            out = AF.key_bias(self.emphasis, offset + kv_length, self.log_alpha, batch=batch, device=device)
            out = self._cache[key] = out[:, offset:] if offset else out
        return out

    def key_channel(self, kv_length: int, batch: int, device: torch.device, dtype: torch.dtype,
                    scaling: float, offset: int = 0) -> torch.Tensor:
        """``bias / scaling`` in the key dtype: the extra key channel of the fused SDPA path."""
        key = ("channel", (kv_length, offset), batch, device, dtype, scaling)
        out = self._cache.get(key)
        if out is None:
            self._evict("channel", (kv_length, offset))
            out = self._cache[key] = (self.bias(kv_length, batch, device, offset) / scaling).to(dtype)
        return out

    def _evict(self, kind: str, size: tuple[int, int]) -> None:
        """Drop cached tensors of other key ranges (decoding grows the length by one per step); the
        ranges of full and of sliding-window layers alternate, so keep two."""
        stale = [k for k in self._cache if k[0] == kind and k[1] != size]
        for k in stale[:-1]:
            del self._cache[k]

    def clear(self) -> None:
        self._cache.clear()
        self.kv_offsets.clear()


def push_plan(configs: Iterable[Any], plan: KeyBiasPlan) -> None:
    with _LOCK:
        for cfg in configs:
            _PLANS.setdefault(id(cfg), []).append(plan)


def pop_plan(configs: Iterable[Any], plan: KeyBiasPlan) -> None:
    with _LOCK:
        for cfg in configs:
            stack = _PLANS.get(id(cfg))
            if not stack:
                continue
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is plan:
                    del stack[i]
                    break
            if not stack:
                del _PLANS[id(cfg)]
    plan.clear()


def active_plans() -> int:
    """Number of configs with an active plan (0 when no steering context is open)."""
    return len(_PLANS)


def _plan_for(module: Any) -> KeyBiasPlan | None:
    stack = _PLANS.get(id(getattr(module, "config", None)))
    return stack[-1] if stack else None


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
    zeros = torch.zeros(query.shape[0], key.shape[2], device=query.device)
    scale = torch.zeros(query.shape[1], device=query.device)
    return AF.eager_key_bias(query, key, value, attention_mask, scaling=scaling or query.shape[-1] ** -0.5,
                             bias=zeros, head_scale=scale, dropout=dropout,
                             training=getattr(module, "training", False), softcap=kwargs.get("softcap"))


def _unsupported(module: Any, kwargs: dict) -> None:
    if getattr(module, "sinks", None) is not None:
        raise SteeringError(f"{type(module).__name__} uses attention sinks, which steering does not support")
    if kwargs.get("position_bias") is not None:
        raise SteeringError(f"{type(module).__name__} uses a position bias, which steering does not support")


def sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                   **kwargs):
    """``ctxaware_sdpa``: transformers' SDPA attention plus the active plan's key bias."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = _plan_for(module)
    head_scale = plan.scale_for(getattr(module, "layer_idx", None), query.device) if plan else None
    if head_scale is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    _unsupported(module, kwargs)
    if kwargs.get("softcap") is not None:
        raise SteeringError("sdpa attention does not support softcap; load the model with attn_implementation='eager'")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, kv_length = query.shape[0], key.shape[2]
    offset = plan.kv_offset(kwargs.get("sliding_window"))
    if query.shape[2] == 1:
        bias = plan.bias(kv_length, batch, query.device, offset)
        out = AF.sdpa_decode_key_bias(query, key, value, attention_mask, scaling=scaling, bias=bias,
                                      head_scale=head_scale, dropout=dropout)
    else:
        channel = plan.key_channel(kv_length, batch, query.device, key.dtype, scaling, offset)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = AF.sdpa_key_bias(query, key, value, attention_mask, scaling=scaling, key_channel=channel,
                               head_scale=head_scale, is_causal=causal, dropout=dropout)
    return out, None


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``ctxaware_eager``: the model's eager attention plus the active plan's key bias."""
    plan = _plan_for(module)
    head_scale = plan.scale_for(getattr(module, "layer_idx", None), query.device) if plan else None
    if head_scale is None:
        return _model_eager(module)(module, query, key, value, attention_mask, scaling=scaling,
                                    dropout=dropout, **kwargs)
    _unsupported(module, kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    bias = plan.bias(key.shape[2], query.shape[0], query.device, plan.kv_offset(kwargs.get("sliding_window")))
    return AF.eager_key_bias(query, key, value, attention_mask, scaling=scaling, bias=bias,
                             head_scale=head_scale, dropout=dropout,
                             training=getattr(module, "training", False), softcap=kwargs.get("softcap"))


def _recording(mask_fn: Callable) -> Callable:
    """A mask function that first notes the key offset of sliding-window masks in the active plan."""

    def mask(*args: Any, **kwargs: Any) -> Any:
        local_size, config = kwargs.get("local_size"), kwargs.get("config")
        if local_size and config is not None:
            stack = _PLANS.get(id(config))
            if stack:
                offset = kwargs.get("kv_offset", 0)
                stack[-1].kv_offsets[int(local_size)] = int(offset)
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
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(SDPA_NAME, sdpa_attention)
    AttentionInterface.register(EAGER_NAME, eager_attention)
    AttentionMaskInterface.register(SDPA_NAME, _recording(sdpa_mask))
    AttentionMaskInterface.register(EAGER_NAME, _recording(eager_mask))
    _REGISTERED = True


def steered_name(current: str | None) -> str:
    """The ctxaware implementation wrapping ``current`` (``sdpa`` for anything but eager)."""
    if current in WRAPPED:
        return current  # type: ignore[return-value]
    if current == "eager":
        return EAGER_NAME
    if current not in (None, "sdpa"):
        logger.warning("attention implementation %r is replaced by %s while steering (same math, "
                       "different kernel)", current, SDPA_NAME)
    return SDPA_NAME
