"""The target-share rule (METHOD "Target share"): per query and head, the smallest down-weighting.

For a query ``q`` and head ``h`` with attention shares ``m_E`` (emphasised prompt keys), ``m_N``
(the other prompt keys) and ``m_G`` (generated keys), adding ``b ≤ 0`` to the scores of the N keys
gives the emphasised share ``m_E / (m_E + e^b m_N + m_G)``; the smallest change reaching share
``s`` is ``b = min(0, log((m_E (1−s)/s − m_G) / m_N))``, clamped at a floor (``b`` would be −∞
when the generated keys alone exceed ``1 − s``). The shares are ratios of the partition sums, so
they come exactly from one SDPA call whose values are the indicator channels of E, N and G (the
fused kernel, no ``T × T`` tensor); :func:`shares_eager` is the same from explicit scores.
"""

from __future__ import annotations

import torch

from .functional import HALF, sdpa_padded


def share_bias(m_e: torch.Tensor, m_n: torch.Tensor, m_g: torch.Tensor, share: torch.Tensor,
               floor: float) -> torch.Tensor:
    """float64 ``b`` from the shares (any common shape) and the target ``share`` (broadcastable)."""
    m_e, m_n, m_g, s = m_e.double(), m_n.double(), m_g.double(), share.double()
    num = m_e * (1.0 - s) / s - m_g
    tiny = torch.finfo(torch.float64).tiny
    b = torch.log(num.clamp_min(tiny) / m_n.clamp_min(tiny)).clamp(min=floor, max=0.0)
    b = torch.where(num <= 0, torch.full_like(b, floor), b)
    return torch.where(m_n > 0, b, torch.zeros_like(b))


def indicator_values(emphasised: torch.Tensor, down: torch.Tensor, n_kv: int, dtype: torch.dtype,
                     width: int = 8) -> torch.Tensor:
    """``(B, Hkv, Tk, width)`` values ``[1[E], 1[N], 1[G], 0…]``; ``width`` = the query's head dim keeps
    the fused kernels eligible (CPU flash wants equal q/v widths, CUDA kernels an aligned width)."""
    gen = ~(emphasised | down)
    v = torch.stack([emphasised, down, gen], dim=-1).to(dtype)
    v = torch.nn.functional.pad(v, (0, max(width, 3) - 3))
    return v[:, None].expand(v.shape[0], n_kv, *v.shape[1:])


def shares_sdpa(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, *,
                scaling: float, emphasised: torch.Tensor, down: torch.Tensor, is_causal: bool
                ) -> torch.Tensor:
    """``(B, H, Tq, 3)`` float32 shares ``m_E, m_N, m_G`` per query and head (half inputs upcast)."""
    work = torch.float32 if query.dtype in HALF else query.dtype
    q, k = query.to(work), key.to(work)
    v = indicator_values(emphasised, down, key.shape[1], work, width=q.shape[-1])
    tq, tk = q.shape[2], k.shape[2]
    causal = bool(tq > 1 and attention_mask is None and is_causal)
    if causal and tk > tq:
        k, v = k[:, :, :tq], v[:, :, :tq]
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(work)
    out = sdpa_padded(q, k, v.contiguous(), mask, scaling=scaling, is_causal=causal)
    return out[..., :3]


def shares_eager(scores: torch.Tensor, emphasised: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``(B, H, Tq, 3)`` shares from explicit (masked) scores ``(B, H, Tq, Tk)``, in float64."""
    probs = scores.double().softmax(-1)
    gen = ~(emphasised | down)
    ind = torch.stack([emphasised, down, gen], dim=-1).double()  # (B, Tk, 3)
    return torch.einsum("bhqk,bkc->bhqc", probs, ind)


def share_coef(shares: torch.Tensor, share: torch.Tensor, selected: torch.Tensor, floor: float) -> torch.Tensor:
    """``(B, H, Tq)`` float64 per-query coefficient ``b_q`` (0 where the row or head is not steered).

    ``share``: float64 ``(B,)`` targets (NaN = row not under the share rule); ``selected``: bool
    ``(B, H)`` steered heads.
    """
    s = share.view(-1, 1, 1)
    on = selected[:, :, None] & ~torch.isnan(s)
    b = share_bias(shares[..., 0], shares[..., 1], shares[..., 2], torch.nan_to_num(s, nan=0.5), floor)
    return torch.where(on, b, torch.zeros_like(b))
