"""The observation mechanism: attention mass from chosen queries onto weighted key sets, per head.

The attention mass of query ``t`` on a key set ``S`` is ``Σ_{j∈S} p(t, j)``. With ``U`` the
``(T × C)`` matrix whose column ``c`` is the indicator (or weight) of key set ``c``, the masses of
all sets are the attention output ``softmax(q·Kᵀ)·U``: ``U`` takes the place of the values. We
compute it inside the model's own forward pass, from the very query/key states the model uses
(after RoPE, before the grouped-query repeat), for the chosen query rows only, in float32 and in
query chunks of at most ``_MAX_SCORE_ELEMENTS`` scores: the memory is bounded by that constant
(``O(heads · T)`` once a chunk is down to one row), never a ``T × T`` matrix per head or layer.

How: while :func:`observe_mass` runs, every config of the model has its ``_attn_implementation``
switched to ``"ctxaware_measure"``, an attention function registered with transformers'
``AttentionInterface`` (with a mask function of the same name in ``AttentionMaskInterface``, so
the mask is built exactly as for the implementation it wraps). For a layer of interest it computes
the mass, then (unless it is the deepest requested layer) delegates the ordinary attention output
to the implementation the model was loaded with (its own ``eager_attention_forward`` for eager
models such as Gemma-2 with softcapping, otherwise the registered function that was active, e.g.
``sdpa`` or a steering backend), with that implementation's mask. After the deepest requested layer it raises a private exception that ends the
forward pass: layers above it, the final norm and the LM head never run. The previous
implementation names are restored in ``finally``. A model whose attention does not go through the
registry is refused up front; a requested layer the forward pass never reached is an error naming
the model class, raised after that first forward pass.

Padding: without an ``attention_mask`` the batch must be *right*-padded (or unpadded). A causal
decoder never lets a real token see a pad that comes after it, so no padding mask is needed and
the model keeps its fused causal kernel with no ``T × T`` mask at all; this is what
:func:`ctxaware.measure.measure_attention` and the scorer do. Left-padded batches work too (pass
the ``attention_mask``; positions are then taken from it), at the price of the model's own
padding mask.
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

import sys

from ..attention.backend import get_impl, model_dims, supports_registry, switched_implementation
from ..errors import ConfigError, SteeringError

logger = logging.getLogger(__name__)

IMPL_NAME = "ctxaware_measure"
_MAX_SCORE_ELEMENTS = 1 << 24  # float32 scores held at once per chunk (64 MiB)


class _StopForward(Exception):
    """Raised after the deepest requested layer to end the forward pass early."""


@dataclass
class _Plan:
    """What to observe during one forward pass (one batch)."""

    layers: frozenset[int]
    last_layer: int
    heads: list[int] | None
    queries: torch.Tensor  # (B, Q) long: positions of the query rows
    channels: torch.Tensor  # (B, T, C) float32: key weights per channel
    delegate: str  # attention implementation computing the real output
    results: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[_Plan | None] = contextvars.ContextVar("ctxaware_measure_plan", default=None)
_REGISTERED = False


def _delegate_name(current: str | None) -> str:
    """The implementation computing the real output: the one the model was loaded with
    (``sdpa`` when unset or when it is the measurement itself)."""
    if not isinstance(current, str) or current in ("", IMPL_NAME):
        return "sdpa"
    return current


def _mask_name(name: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return name if name in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"


def _measure_mask(*args: Any, **kwargs: Any):
    """Mask function under ``IMPL_NAME``: the mask of the wrapped implementation."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    plan = _ACTIVE.get()
    return ALL_MASK_ATTENTION_FUNCTIONS[_mask_name(plan.delegate if plan is not None else "sdpa")](*args, **kwargs)


_EAGER: dict[type, Any] = {}


def _delegate_fn(module: Any, name: str):
    """The attention function ``name`` as the module's layer would call it (``eager`` = its own file's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]
    cls = type(module)
    fn = _EAGER.get(cls)
    if fn is None:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            raise ConfigError(f"{cls.__name__}: its modeling file has no eager_attention_forward to delegate to; "
                              "load the model with attn_implementation='sdpa'")
        _EAGER[cls] = fn
    return fn


def _measure_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function under ``IMPL_NAME``: observe the mass, then delegate the output."""
    plan = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if plan is not None and layer in plan.layers:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if kwargs.get("position_bias") is not None or getattr(module, "sinks", None) is not None:
            raise ConfigError(f"{type(module).__name__} uses a position bias or attention sinks, which the "
                              "attention measurement does not support")
        plan.results[layer] = _mass(query, key, attention_mask, scaling, plan, kwargs.get("softcap"))
        if layer == plan.last_layer:
            raise _StopForward
    fn = _delegate_fn(module, plan.delegate if plan is not None else "sdpa")
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, _measure_attention)
    AttentionMaskInterface.register(IMPL_NAME, _measure_mask)
    _REGISTERED = True


def _allowed_rows(attention_mask, rows: torch.Tensor, key_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For the gathered query rows: ``(allowed bool (B, 1, c, T) | None, additive float mask | None)``.

    ``attention_mask`` is what the layer received: None (plain causal), a 2D padding mask
    ``(B, T)`` (flash-style implementations), or a 4D bool/float mask ``(B|1, 1, Tq|1, T)``.
    """
    device = rows.device
    causal = rows[:, None, :, None] >= torch.arange(key_len, device=device)[None, None, None, :]
    if attention_mask is None:
        return causal, None
    if hasattr(attention_mask, "mask_mod"):  # flex_attention's BlockMask: its mask_mod on the gathered rows
        k_idx = torch.arange(key_len, device=device)[None, None, None, :]
        b_idx = torch.arange(rows.shape[0], device=device)[:, None, None, None]
        kept = k_idx < attention_mask.seq_lengths[1]
        allowed = attention_mask.mask_mod(b_idx, torch.zeros_like(b_idx), rows[:, None, :, None],
                                          torch.minimum(k_idx, torch.tensor(attention_mask.seq_lengths[1] - 1)))
        return (torch.as_tensor(allowed, device=device) & kept).expand(rows.shape[0], 1, rows.shape[1], key_len), None
    mask = attention_mask.to(device)
    if mask.dim() == 2:  # key padding only
        return causal & mask[:, None, None, :key_len].bool(), None
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ConfigError(f"unsupported attention mask of shape {tuple(mask.shape)} (per-head masks are not "
                          "supported by the measurement)")
    mask = mask[..., :key_len]
    batch = rows.shape[0]
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, *mask.shape[1:])
    if mask.shape[-2] != 1:
        index = rows[:, None, :, None].expand(batch, 1, rows.shape[1], mask.shape[-1])
        mask = mask.gather(2, index)
    if mask.dtype == torch.bool:
        return mask, None
    return None, mask.float()


def _mass(query, key, attention_mask, scaling: float, plan: _Plan, softcap) -> torch.Tensor:
    """``softmax(q·Kᵀ·scaling + mask) @ channels`` for the plan's query rows: ``(B, H, Q, C)`` float32."""
    batch, n_heads, _, dim = query.shape
    key_len = key.shape[2]
    groups = n_heads // key.shape[1]
    heads = plan.heads if plan.heads is not None else list(range(n_heads))
    head_idx = torch.tensor(heads, device=query.device)
    q = query.index_select(1, head_idx)
    k = key.index_select(1, torch.div(head_idx, groups, rounding_mode="floor")).float()
    queries = plan.queries.to(query.device)
    channels = plan.channels.to(device=query.device, dtype=torch.float32)[:, None]  # (B, 1, T, C)
    n_q = queries.shape[1]
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * len(heads) * key_len))
    outs = []
    for lo in range(0, n_q, chunk):
        rows = queries[:, lo:lo + chunk]
        qc = q.gather(2, rows[:, None, :, None].expand(batch, len(heads), rows.shape[1], dim)).float()
        scores = torch.matmul(qc, k.transpose(-1, -2)).mul_(scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        allowed, additive = _allowed_rows(attention_mask, rows, key_len)
        if additive is not None:
            scores.add_(additive)
        if allowed is not None:
            scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        outs.append(torch.matmul(probs, channels))
        del probs
    return torch.cat(outs, dim=2)


@contextmanager
def _measuring(model, plan: _Plan) -> Iterator[_Plan]:
    """Switch every config of ``model`` to the measuring implementation; restore in ``finally``."""
    _register()
    token = _ACTIVE.set(plan)
    try:
        with switched_implementation(model, lambda _impl: IMPL_NAME):
            yield plan
    finally:
        _ACTIVE.reset(token)


def _decoder(model):
    try:
        return model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return model


def observe_mass(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, queries: torch.Tensor,
                 channels: torch.Tensor, *, layers: Sequence[int], heads: Sequence[int] | None = None
                 ) -> dict[int, torch.Tensor]:
    """Attention mass per layer: ``{layer: (B, H, Q, C)}`` float32 on the model's device.

    ``input_ids`` ``(B, T)``: an unpadded or right-padded batch with ``attention_mask=None`` (the
    cheapest: no padding mask is built), or a left-padded batch with its ``attention_mask``
    (positions are then counted from each row's first real token). ``queries`` ``(B, Q)``: query
    positions in the padded sequence (pad a short row with any real position and ignore it).
    ``channels`` ``(B, T, C)``: key weights (0 at padding). ``heads``: query heads to keep (default
    all). The forward pass stops inside ``max(layers)``.
    """
    check_measurable(model)
    n_layers, n_heads = model_dims(model)
    layers = sorted(set(int(x) for x in layers))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ConfigError(f"layers must lie in 0..{n_layers - 1}, got {layers}")
    if heads is not None:
        heads = sorted(set(int(h) for h in heads))
        if not heads or heads[0] < 0 or heads[-1] >= n_heads:
            raise ConfigError(f"heads must lie in 0..{n_heads - 1}, got {heads}")
    if input_ids.dim() != 2 or queries.dim() != 2 or channels.dim() != 3:
        raise ConfigError("observe_mass wants input_ids (B, T), queries (B, Q) and channels (B, T, C)")
    if channels.shape[:2] != input_ids.shape or queries.shape[0] != input_ids.shape[0]:
        raise ConfigError(f"shape mismatch: input_ids {tuple(input_ids.shape)}, queries {tuple(queries.shape)}, "
                          f"channels {tuple(channels.shape)}")
    if queries.numel() and (int(queries.min()) < 0 or int(queries.max()) >= input_ids.shape[1]):
        raise ConfigError(f"query positions must lie in 0..{input_ids.shape[1] - 1}")
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    plan = _Plan(layers=frozenset(layers), last_layer=layers[-1], heads=heads, queries=queries.long(),
                 channels=channels, delegate=_delegate_name(get_impl(model.config)))
    decoder = _decoder(model)
    with torch.inference_mode(), _measuring(model, plan):
        try:
            decoder(**kwargs)
        except _StopForward:
            pass
    missing = [x for x in layers if x not in plan.results]
    if missing:
        raise SteeringError(f"{type(model).__name__}: attention layers {missing} never went through the "
                            "measurement in the forward pass (their attention modules bypass transformers' "
                            "attention registry or have no layer_idx); measure a model whose attention does")
    return plan.results


def check_measurable(model: Any) -> None:
    """Refuse, in one line naming the class, a model whose attention bypasses transformers' registry."""
    if not supports_registry(model):
        raise SteeringError(f"{type(model).__name__} computes attention without transformers' attention registry, "
                            "so ctxaware can neither steer nor measure it; use a model whose class supports "
                            "attention backends (Llama, Mistral, Gemma, Qwen, Phi-3, ...)")
