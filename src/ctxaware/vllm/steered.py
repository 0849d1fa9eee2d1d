"""Exact steered attention rows for requests of a vLLM batch, from K/V read back from the paged cache.

The plugin's attention backend runs vLLM's own kernel over the whole batch, then overwrites the
output rows of the steered requests with :func:`steered_attention` (pure torch, no vLLM import):

    out[q] = softmax_k( s(q, k) + coef_h · 1[k down-weighted] ) · V,   s = softcap(scale · q·k)

with the causal limit ``k ≤ pos(q)``, the sliding window ``pos(q) − k < window`` and the key
padding of the batch. ``coef_h = log(α)`` (times the compounding multiplier) on the steered query
heads of the layer, 0 elsewhere; "down-weighted" = a prompt key outside the emphasised spans
(METHOD §2). Grouped-query attention is computed per KV head without repeating K/V.

Vectorised over requests (padded to the longest), query rows (in chunks that bound the
``rows × heads × keys`` score block) and heads; without softcap one fused
``scaled_dot_product_attention`` call per chunk (bias and masks as its additive mask, GQA inside),
with softcap explicit matmuls; computed in float32 (float64 stays float64), cast back to the
output's dtype.
"""

from __future__ import annotations

import torch

SCORE_BUDGET = 1 << 24  # most score elements held at once (64 MiB of float32)


def steered_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, q_pos: torch.Tensor,
                      kv_len: torch.Tensor, coef: torch.Tensor, down: torch.Tensor, scale: float,
                      softcap: float = 0.0, window: int = -1) -> torch.Tensor:
    """Steered attention of ``R`` requests (padded).

    ``query`` (R, Q, Hq, D); ``key``/``value`` (R, Hkv, S, D); ``q_pos`` (R, Q) absolute positions of
    the query rows (padding rows: any value, their output is garbage and ignored); ``kv_len`` (R,)
    valid keys per request; ``coef`` (R, Hq) bias added to down-weighted keys (``log α`` or 0);
    ``down`` (R, S) bool. Returns (R, Q, Hq, D) in ``query``'s dtype.
    """
    r, q, hq, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not group over {hkv} KV heads")
    g = hq // hkv
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    k = key.to(work)
    v = value.to(work)
    keys = torch.arange(s, device=query.device)
    valid = keys[None, :] < kv_len[:, None]  # (R, S)
    bias = coef.to(work)[:, :, None] * down.to(work)[:, None, :]  # (R, Hq, S)
    bias = bias.view(r, hkv, g, 1, s)
    out = torch.empty(r, q, hq, value.shape[-1], dtype=work, device=query.device)
    step = max(1, SCORE_BUDGET // max(1, r * hq * s))
    for a in range(0, q, step):
        b = min(q, a + step)
        pos = q_pos[:, a:b]  # (R, Qc)
        allowed = valid[:, None, :] & (keys[None, None, :] <= pos[:, :, None])
        if window is not None and window > 0:
            allowed = allowed & (pos[:, :, None] - keys[None, None, :] < window)
        if not softcap:  # one fused call: the bias and the masks as one additive mask, GQA in the kernel
            mask = bias.view(r, hq, 1, s).masked_fill(~allowed[:, None], float("-inf"))
            qs = query[:, a:b].to(work).transpose(1, 2)  # (R, Hq, Qc, D)
            o = torch.nn.functional.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale,
                                                                 enable_gqa=hkv != hq)
            out[:, a:b] = o.transpose(1, 2)  # rows with no allowed key (padding) are NaN and never read
            continue
        # (R, Hkv, G·Qc, D) @ (R, Hkv, D, S): the query heads of a KV head share one matmul, K is not repeated
        qc = query[:, a:b].to(work).permute(0, 2, 1, 3).reshape(r, hkv, g * (b - a), d)
        scores = torch.matmul(qc, k.transpose(-1, -2)).view(r, hkv, g, b - a, s) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores + bias
        scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked padding rows -> 0
        o = torch.matmul(probs.view(r, hkv, g * (b - a), s), v)  # (R, Hkv, G·Qc, Dv)
        out[:, a:b] = o.reshape(r, hq, b - a, -1).permute(0, 2, 1, 3)
    return out.to(query.dtype)
