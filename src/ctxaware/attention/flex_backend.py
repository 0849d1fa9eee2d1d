"""``ctxaware_flex``: the steering attention function for models loaded with ``flex_attention``.

Registered by :func:`.backend.register` next to ``ctxaware_sdpa`` / ``ctxaware_eager``, with
transformers' ``flex_attention_mask`` (recording sliding-window key offsets, like the others) as
its mask function, so the layers receive the model's own ``BlockMask``. A layer the active plan
does not steer calls transformers' ``flex_attention_forward`` unchanged (bit-for-bit the loaded
implementation); a steered layer calls compiled flex with the same ``BlockMask`` and a
``score_mod`` that applies the model's softcap (Gemma-2) and then the steering bias
``coef[b, h, q] · down[b, k]`` (:func:`.flex.attention`). Under the target-share rule the shares
``m_E, m_N, m_G`` come from one more flex call whose values are the indicator channels.
"""

from __future__ import annotations

import torch

from ..errors import SteeringError
from . import flex as FX
from . import share as AS
from .backend import _coefficient, _layer_plan, _unsupported

__all__ = ["flex_attention"]


def _flex(query, key, value, mask, *, scaling, coef=None, down=None, softcap=None) -> torch.Tensor:
    out = FX.attention(query, key, value, mask, scaling=scaling, is_causal=True, coef=coef, down=down,
                       softcap=softcap)
    if out is None:
        reason = next(iter(FX.failures().values()), "flex_attention is not supported for these inputs")
        raise SteeringError(f"steered flex_attention failed for {query.device.type} "
                            f"{str(query.dtype).replace('torch.', '')} inputs ({reason}); load the model with "
                            "attn_implementation='sdpa'")
    return out


def flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``ctxaware_flex``: transformers' flex attention plus the current plan's bias."""
    from transformers.integrations.flex_attention import flex_attention_forward

    plan, head_scale = _layer_plan(module, query)
    if head_scale is None:
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    _unsupported(module, kwargs)
    if dropout and getattr(module, "training", False):
        raise SteeringError("flex_attention does not support dropout; call model.eval() or load the model with "
                            "attn_implementation='sdpa'")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, kv_length, device = query.shape[0], key.shape[2], query.device
    offset = plan.kv_offset(kwargs.get("sliding_window"))
    down = plan.down(kv_length, batch, device, offset)
    softcap = kwargs.get("softcap")
    coef = _coefficient(plan, head_scale, query)
    share = plan.row_share(batch, device)
    if share is not None:
        emph = plan.emphasised(kv_length, batch, device, offset)
        work = torch.float32
        ind = AS.indicator_values(emph, down, key.shape[1], work, width=query.shape[-1]).contiguous()
        shares = _flex(query.to(work), key.to(work), ind, attention_mask, scaling=scaling, softcap=softcap)[..., :3]
        coef = coef[..., None] + AS.share_coef(shares, share, head_scale > 0, plan.share_floor)
    out = _flex(query, key, value, attention_mask, scaling=scaling, coef=coef, down=down, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None
