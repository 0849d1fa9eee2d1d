"""Steered prefill as a correction of the plain kernel's output over a few down-weighted keys.

In a chat prompt steered toward the user's turn, the down-weighted keys ``D`` are the system prompt
and the template tokens: tens of keys against thousands. With the plain causal attention's output
``O`` and log-sum-exp ``L`` (one fused CPU flash call at the model's own head width), the mass
``m_D = Σ_{k∈D} p_k`` and ``P_D V_D = Σ_{k∈D} p_k v_k`` (``p_k = exp(s_k − L)``) come from a thin
``Tq × |D|`` product, and the steered output is exactly

    O' = (O − (1 − α) P_D V_D) / (1 − (1 − α) m_D)

(multiplying the down keys' weights by α and renormalising, per query row and head). The
denominator is at least α, so the division amplifies rounding by at most ``1/α``: the path is only
taken for α ≥ :data:`MIN_ALPHA` (at most 2×), in fp32/fp64 on CPU, for a causal prefill without a
padding mask under the fixed-α rule, when ``|D|`` is at most :data:`MAX_DOWN_FRACTION` of the keys.
Everything else goes through the padded channels (:mod:`.functional`). It needs the CPU flash
kernel's log-sum-exp (``aten._scaled_dot_product_flash_attention_for_cpu``); where that op is
missing or refuses the inputs, :func:`attention` returns None and the caller uses the channels.
"""

from __future__ import annotations

import math

import torch

from . import flex as FX
from .functional import repeat_kv

MIN_ALPHA = 0.5  # smallest α (largest down-weighting) taken through the correction
MAX_DOWN_FRACTION = 1 / 32  # most down-weighted keys, as a fraction of the keys
_MIN_COEF = math.log(MIN_ALPHA)


def _flash_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    try:
        out, lse = op(query, key, value, 0.0, True, scale=scaling)[:2]
    except RuntimeError:
        return None
    if out.shape != (*query.shape[:3], value.shape[-1]) or lse.shape != query.shape[:3]:
        return None
    return out, lse


def wanted(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object, *,
           coef: torch.Tensor, down: torch.Tensor, is_causal: bool, dropout: float = 0.0) -> bool:
    """Whether the steered call ``(query, key, value, coef, down)`` goes through :func:`attention`."""
    if FX.current_path() != "auto" or dropout or attention_mask is not None or not is_causal:
        return False
    if query.device.type != "cpu" or query.dtype not in (torch.float32, torch.float64) or coef.dim() != 2:
        return False
    tq, tk = query.shape[2], key.shape[2]
    if tq != tk or tq < 2 or value.shape[-1] != query.shape[-1]:
        return False
    if float(coef.min()) < _MIN_COEF or float(coef.max()) > 0.0:
        return False
    return int(down.sum(-1).max()) <= tk * MAX_DOWN_FRACTION


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float, coef: torch.Tensor,
              down: torch.Tensor) -> torch.Tensor | None:
    """The steered causal attention ``(B, Tq, H, Dv)`` (transformers' layout), or None where the CPU
    flash kernel cannot give its log-sum-exp.

    ``query (B, H, T, D)``, ``key``/``value`` ``(B, Hkv, T, D)``; ``coef``: float ``(B, H)``
    ``log α`` per row and head; ``down``: bool ``(B, T)``.
    """
    got = _flash_lse(query, key, value, scaling)
    if got is None:
        return None
    out, lse = got
    b, h, t, _ = query.shape
    h_kv, d, dv = key.shape[1], key.shape[-1], value.shape[-1]
    counts = down.sum(-1)
    nd = int(counts.max())
    if nd == 0:
        return out.transpose(1, 2).contiguous()
    # the down keys of each row in position order, padded (masked below) to the longest row
    idx = torch.argsort((~down).to(torch.int8), dim=-1, stable=True)[:, :nd]
    valid = torch.arange(nd, device=down.device)[None, :] < counts[:, None]
    n_rep = h // h_kv
    kd = repeat_kv(key.gather(2, idx[:, None, :, None].expand(b, h_kv, nd, d)), n_rep)
    vd = repeat_kv(value.gather(2, idx[:, None, :, None].expand(b, h_kv, nd, dv)), n_rep)
    p = torch.matmul(query, kd.transpose(-1, -2))  # (B, H, T, nd) scores against the down keys
    p.mul_(scaling).sub_(lse[..., None].to(p.dtype))
    later = idx[:, None, :] > torch.arange(t, device=idx.device)[None, :, None]  # causal: key after query
    p.masked_fill_((later | ~valid[:, None, :])[:, None], float("-inf")).exp_()
    keep = (-torch.expm1(coef.double())).to(query.dtype)[:, :, None, None]  # 1 − α per row and head
    inv_den = p.sum(-1, keepdim=True).mul_(-keep).add_(1).reciprocal_()
    p.mul_(inv_den * -keep)
    corr = torch.matmul(p, vd)  # −(1 − α) P_D V_D / den
    res = torch.empty(b, t, h, dv, dtype=query.dtype, device=query.device)
    torch.addcmul(corr.transpose(1, 2), out.transpose(1, 2), inv_den.transpose(1, 2), out=res)
    return res
