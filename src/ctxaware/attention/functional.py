"""Pure tensor math of attention with a per-key, per-head additive bias on the scores.

The steering bias adds ``s_h · b_k`` to the pre-softmax score of query head ``h`` and key ``k``:
``b_k`` depends on the key only (``log α`` on non-emphasised prompt keys, 0 elsewhere) and ``s_h``
on the query head only (1 for steered heads, 0 for the others; ``i + 1`` under the reference
compounding). Nothing here materialises a ``T × T`` tensor per head:

* :func:`sdpa_key_bias` (prefill, any query length) folds the bias into SDPA through one extra
  channel: ``q' = [q, s_h]``, ``k' = [k, b_k / scale]`` and SDPA called with ``scale`` explicitly,
  so ``scale · q'·k' = scale · q·k + s_h · b_k``. The causal flag, the boolean padding mask and
  un-repeated grouped-query heads (``enable_gqa``) stay as they are, so SDPA keeps its fused
  causal kernel. ``v`` gets a zero channel (CPU flash attention wants equal head dims; this is
  faster than unequal dims) that is dropped from the output.
* :func:`sdpa_decode_key_bias` (one query token, the KV-cache decode step): a float mask of
  ``(B, H, 1, T)`` — O(T) per head — with the grouped query heads packed as query rows.
* :func:`eager_key_bias`: the eager formula (scores + mask + bias, float32 softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, Hkv, T, D) -> (B, Hkv·n_rep, T, D)``, each kv head repeated ``n_rep`` times in place."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def key_bias(emphasis: torch.Tensor, kv_length: int, log_alpha: float, *, batch: int | None = None,
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-key bias ``(B, kv_length)``: ``log_alpha`` on prompt keys not emphasised, 0 elsewhere.

    ``emphasis``: bool ``(B0, P)`` aligned to the padded prompt (``P`` = prompt length). Keys at
    positions ``>= P`` (generated) get 0. ``batch`` (a multiple of ``B0``) repeats each row for
    beam search / several return sequences.
    """
    emphasis = emphasis.to(device=device)
    b0, prompt_len = emphasis.shape
    if batch is not None and batch != b0:
        emphasis = emphasis.repeat_interleave(batch // b0, dim=0)
    n = min(prompt_len, kv_length)
    bias = torch.zeros(emphasis.shape[0], kv_length, dtype=dtype, device=emphasis.device)
    bias[:, :n].masked_fill_(~emphasis[:, :n], log_alpha)
    return bias


def sdpa_key_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *, scaling: float, key_channel: torch.Tensor,
                  head_scale: torch.Tensor, is_causal: bool = True, dropout: float = 0.0) -> torch.Tensor:
    """SDPA with ``head_scale[h] · bias[b, k]`` added to the scores; returns ``(B, Tq, H, Dv)``.

    ``key_channel``: ``(B, Tk)`` = bias / scaling, in the key dtype. ``head_scale``: ``(H,)``.
    ``query (B, H, Tq, D)``, ``key``/``value`` ``(B, Hkv, Tk, D)`` with ``H`` a multiple of
    ``Hkv`` (not yet repeated). ``attention_mask``: None, or a bool/float mask broadcastable to
    ``(B, 1, Tq, Tk)`` as built by ``sdpa_mask``.
    """
    b, h, tq, d = query.shape
    h_kv, tk, dv = key.shape[1], key.shape[2], value.shape[-1]
    n_rep = h // h_kv
    # Same conventions as transformers' sdpa_attention_forward.
    is_causal = bool(tq > 1 and attention_mask is None and is_causal)
    if is_causal and tk > tq:  # prefill into an empty static cache: drop the unused tail
        key, value, key_channel, tk = key[:, :, :tq], value[:, :, :tq], key_channel[:, :tq], tq
    q2 = query.new_empty(b, tq, h, d + 1).transpose(1, 2)
    q2[..., :d] = query
    q2[..., d] = head_scale.to(query.dtype).view(1, h, 1)
    k2 = key.new_empty(b, h_kv, tk, d + 1)
    k2[..., :d] = key
    k2[..., d] = key_channel[:, None, :]
    if dv == d:
        v2 = value.new_empty(b, h_kv, tk, d + 1)
        v2[..., :d] = value
        v2[..., d] = 0
    else:
        v2 = value
    extra = {}
    if n_rep > 1:
        if attention_mask is None:
            extra["enable_gqa"] = True
        else:
            k2, v2 = repeat_kv(k2, n_rep), repeat_kv(v2, n_rep)
    out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=is_causal, **extra)
    return out[..., :dv].transpose(1, 2).contiguous()


def bias_mask(bias: torch.Tensor, head_scale: torch.Tensor, attention_mask: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
    """Float mask ``(B, H, Tq, Tk)`` (``Tq`` from the mask, else 1) = head_scale ⊗ bias + mask."""
    work = torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 model
    full = head_scale.to(work).view(1, -1, 1, 1) * bias.to(work)[:, None, None, :]
    if attention_mask is not None:
        tk = bias.shape[-1]
        mask = attention_mask[..., :tk]
        if mask.dtype == torch.bool:
            full = full.masked_fill(~mask, torch.finfo(dtype).min)
        else:
            full = full + mask.to(work)
    return full.to(dtype)


def sdpa_decode_key_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, *, scaling: float, bias: torch.Tensor,
                         head_scale: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """One query token: SDPA with a ``(B, H, 1, Tk)`` float mask; returns ``(B, 1, H, Dv)``.

    The ``n_rep`` query heads sharing a kv head are packed as ``n_rep`` query rows, so keys and
    values are never repeated (and never copied).
    """
    b, h, tq, d = query.shape
    h_kv, dv = key.shape[1], value.shape[-1]
    n_rep = h // h_kv
    mask = bias_mask(bias, head_scale, attention_mask, query.dtype)  # (B, H, 1, Tk)
    if mask.shape[0] != b:
        mask = mask.expand(b, *mask.shape[1:])
    if n_rep > 1 and tq == 1:
        q = query.reshape(b, h_kv, n_rep, d)
        mask = mask.reshape(b, h_kv, n_rep, mask.shape[-1])
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        out = out.reshape(b, h, 1, dv)
    else:
        out = F.scaled_dot_product_attention(query, repeat_kv(key, n_rep), repeat_kv(value, n_rep),
                                             attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def eager_key_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, *, scaling: float, bias: torch.Tensor,
                   head_scale: torch.Tensor, dropout: float = 0.0, training: bool = False,
                   softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention plus ``head_scale[h] · bias[b, k]``; returns ``(out (B, Tq, H, Dv), probs)``."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]]
    scores = scores + (head_scale.to(scores.dtype).view(1, -1, 1, 1) * bias.to(scores.dtype)[:, None, None, :])
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs
