"""Pure tensor math of attention with an additive, rank-one bias on the scores.

Steering adds ``c[b, h, q] · u[b, k]`` to the pre-softmax score of row ``b``, query head ``h``,
query ``q`` and key ``k``: ``u`` is the indicator of the down-weighted keys (prompt keys outside
the emphasis) and ``c`` is ``head_scale[b, h] · log α_b`` under the fixed-α rule, or the per-query
``b_q`` of the target-share rule. Nothing here materialises a ``T × T`` tensor per head:

* :func:`sdpa_channels` (prefill where the thin correction does not apply) folds the bias into SDPA through
  extra channels: ``q' = [q, c₁, c₂, …, 0…]``, ``k' = [k, u, u, …, 0…]`` with ``c₁ + c₂ + … =
  c / scale`` (a hi/lo split: ``c₁`` is ``c / scale`` rounded to the dtype, ``c₂`` the rounded
  remainder, …) and SDPA called with ``scale`` explicitly, so ``scale · q'·k' = scale · q·k + c·u``
  with the bias exact to the dtype's precision squared (cubed), not to its precision. On CUDA the
  width is padded to a multiple of 8 (half types) or 4 (fp32) so the fused kernels stay eligible
  (:mod:`.kernels`); on CPU, whose flash kernel takes any width, only the needed channels are
  added (each costs time there). ``v`` is zero-padded to the same width. The causal flag, a boolean padding
  mask and un-repeated grouped-query heads (``enable_gqa``) are passed through unchanged.
* :func:`sdpa_key_bias` (what the registered backend calls): the bias ``coef ⊗ down`` through
  :func:`sdpa_channels`, or — where only SDPA's math kernel could take the padded inputs and the
  scores would be large, or when forced with :func:`.flex.use_path` — through compiled
  ``flex_attention`` with a ``score_mod`` (:mod:`.flex`), which never materialises the scores; if
  flex cannot compile the inputs, the chunked SDPA below is the fallback.
* :func:`sdpa_decode_mask` (one query token, every dtype on CPU and CUDA): a float mask
  ``(B, H, 1, T)`` — O(T) per head — with the grouped query heads packed as query rows, so the
  KV cache is read in place, never copied into padded channels (:func:`decode_mask_dtype`).
* :func:`eager_bias`: the eager formula (scores + mask + bias, float32 softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import flex as FX
from .kernels import HALF, kernel_for

CHUNK_QUERIES = 512  # query rows per chunk where only the math kernel can take the inputs
CHUNK_MIN_SCORES = 1 << 22  # ... once Tq·Tk exceeds this


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
    positions ``>= P`` (generated) get 0. ``batch`` (a multiple of ``B0``) repeats each row.
    """
    emphasis = emphasis.to(device=device)
    b0, prompt_len = emphasis.shape
    if batch is not None and batch != b0:
        emphasis = emphasis.repeat_interleave(batch // b0, dim=0)
    n = min(prompt_len, kv_length)
    bias = torch.zeros(emphasis.shape[0], kv_length, dtype=dtype, device=emphasis.device)
    bias[:, :n].masked_fill_(~emphasis[:, :n], log_alpha)
    return bias


def padded_width(head_dim: int, dtype: torch.dtype, target: str = "cuda") -> int:
    """Head width of the steered q/k/v on a ``target`` device type.

    CUDA: at least one extra channel, rounded up to the fused kernels' alignment (8 elements for
    fp16/bf16, 4 otherwise). Elsewhere (CPU flash takes any width, and every extra channel costs
    time there): exactly the channels the split bias needs (2 in half types, else 1).
    """
    if target != "cuda":
        return head_dim + (2 if dtype in HALF else 1)
    align = 8 if dtype in HALF else 4
    return -(-(head_dim + 1) // align) * align


def split_parts(x: torch.Tensor, dtype: torch.dtype, parts: int) -> torch.Tensor:
    """``x`` (float64) as ``parts`` tensors of ``dtype`` stacked on a new last dim whose float64 sum
    approximates ``x`` to about ``eps(dtype) ** parts`` relative error."""
    x = x.double()
    out, rest = [], x
    for _ in range(parts):
        piece = rest.to(dtype)
        out.append(piece)
        rest = rest - piece.double()
    return torch.stack(out, dim=-1)


def channel_parts(head_dim: int, dtype: torch.dtype, target: str = "cuda") -> int:
    """How many spare channels carry the split bias: on CUDA up to 3 in half types, 2 in fp32, 1 in
    fp64 (the padding is there anyway); elsewhere 2 in half types, else 1."""
    spare = padded_width(head_dim, dtype, target) - head_dim
    want = 3 if dtype in HALF else 2 if dtype == torch.float32 else 1
    return max(1, min(spare, want))


def padded_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_channels: torch.Tensor,
               k_channels: torch.Tensor, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q' = [q, q_channels, 0…]``, ``k' = [k, k_channels, 0…]``, ``v' = [v, 0…]`` at the padded width.

    ``q_channels``: ``(B, H, Tq or 1, n)``; ``k_channels``: ``(B, Tk, n)`` (same for every kv head).
    ``v`` is padded only when its head dim equals the query's. ``target``: the device type whose
    kernel constraints the width meets (default: the query's).
    """
    b, h, tq, d = query.shape
    h_kv, tk, dv = key.shape[1], key.shape[2], value.shape[-1]
    n = q_channels.shape[-1]
    width = padded_width(d, query.dtype, target or query.device.type)
    if d + n > width:
        raise ValueError(f"{n} extra channel(s) do not fit in the padded width {width} of head dim {d}")
    pad = width - d - n
    # one write per element (no zero fill first); the queries come out contiguous per head, which
    # the CPU flash kernel runs ~10 % faster than transformers' (B, T, H) strides
    qc = q_channels.to(query.dtype).expand(b, h, tq, n)
    q2 = torch.cat([query, qc] + ([query.new_zeros(b, h, tq, pad)] if pad else []), dim=-1)
    kc = k_channels.to(key.dtype)[:, None].expand(b, h_kv, tk, n)
    k2 = torch.cat([key, kc] + ([key.new_zeros(b, h_kv, tk, pad)] if pad else []), dim=-1)
    v2 = F.pad(value, (0, width - d)) if dv == d else value
    return q2, k2, v2


def sdpa_padded(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, attention_mask: torch.Tensor | None,
                *, scaling: float, is_causal: bool, dropout: float = 0.0) -> torch.Tensor:
    """SDPA on (possibly grouped-query) tensors with transformers' conventions; ``(B, H, Tq, Dv)``.

    Where no fused kernel can take the inputs (:func:`~.kernels.kernel_for` says ``math``) and the
    scores would be large, compiled flex_attention computes the output (no scores held, :mod:`.flex`);
    where it cannot, queries are processed in chunks of :data:`CHUNK_QUERIES` rows, so at most
    ``B·H·CHUNK_QUERIES·Tk`` scores exist at a time.
    """
    n_rep = q2.shape[1] // k2.shape[1]
    extra = {}
    if n_rep > 1:
        if attention_mask is None and not (q2.is_cuda and q2.dtype not in HALF):
            extra["enable_gqa"] = True  # flash (half types, CUDA) and the CPU kernel take GQA as is
        else:
            k2, v2 = repeat_kv(k2, n_rep), repeat_kv(v2, n_rep)
    tq, tk = q2.shape[2], k2.shape[2]
    mask_kind = None if attention_mask is None else "bool" if attention_mask.dtype == torch.bool else "float"
    kernel = kernel_for(q2.shape, k2.shape, v2.shape, q2.dtype, q2.device, mask=mask_kind, dropout=dropout,
                        enable_gqa=bool(extra))
    if kernel == "math" and tq > CHUNK_QUERIES and tq * tk > CHUNK_MIN_SCORES:
        if FX.current_path() != "sdpa" and dropout == 0.0:
            out = FX.attention(q2, k2, v2, attention_mask, scaling=scaling, is_causal=is_causal)
            if out is not None:
                return out
        return _chunked(q2, k2, v2, attention_mask, scaling=scaling, is_causal=is_causal, dropout=dropout, **extra)
    return F.scaled_dot_product_attention(q2, k2, v2, attn_mask=attention_mask, dropout_p=dropout,
                                          scale=scaling, is_causal=is_causal, **extra)


def _chunked(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, attention_mask: torch.Tensor | None, *,
             scaling: float, is_causal: bool, dropout: float, **extra: bool) -> torch.Tensor:
    """SDPA by chunks of query rows (the causal flag becomes each chunk's rows of the triangle)."""
    tq, tk = q2.shape[2], k2.shape[2]
    outs = []
    for i0 in range(0, tq, CHUNK_QUERIES):
        i1 = min(tq, i0 + CHUNK_QUERIES)
        mask = attention_mask
        if mask is not None and mask.shape[-2] != 1:
            mask = mask[..., i0:i1, :]
        if is_causal:  # top-left aligned, as SDPA's is_causal
            rows = torch.arange(i0, i1, device=q2.device)[:, None]
            mask = torch.arange(tk, device=q2.device)[None, :] <= rows
        outs.append(F.scaled_dot_product_attention(q2[:, :, i0:i1], k2, v2, attn_mask=mask, dropout_p=dropout,
                                                   scale=scaling, **extra))
    return torch.cat(outs, dim=2)


def sdpa_channels(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *, scaling: float, q_channels: torch.Tensor,
                  k_channels: torch.Tensor, is_causal: bool = True, dropout: float = 0.0) -> torch.Tensor:
    """SDPA with ``scale · Σ_c q_channels[..., c] · k_channels[..., c]`` added to the scores.

    ``query (B, H, Tq, D)``, ``key``/``value`` ``(B, Hkv, Tk, D)`` (not yet repeated);
    ``attention_mask``: None, or a bool/float mask broadcastable to ``(B, 1, Tq, Tk)`` as built by
    ``sdpa_mask``. Returns ``(B, Tq, H, Dv)`` like transformers' ``sdpa_attention_forward``.
    """
    tq, tk, dv = query.shape[2], key.shape[2], value.shape[-1]
    is_causal = bool(tq > 1 and attention_mask is None and is_causal)
    if is_causal and tk > tq:  # prefill into an empty static cache: drop the unused tail
        key, value, k_channels = key[:, :, :tq], value[:, :, :tq], k_channels[:, :tq]
    q2, k2, v2 = padded_qkv(query, key, value, q_channels, k_channels)
    out = sdpa_padded(q2, k2, v2, attention_mask, scaling=scaling, is_causal=is_causal, dropout=dropout)
    return out[..., :dv].transpose(1, 2).contiguous()


def steered_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: str | None = None,
                   dropout: float = 0.0) -> str:
    """The SDPA kernel :func:`sdpa_channels` hands its padded inputs to (``query (B, H, Tq, D)``,
    ``key``/``value`` ``(B, Hkv, Tk, D)``; ``mask``: None, ``"bool"`` or ``"float"``)."""
    b, h, tq, d = query.shape
    h_kv, tk, dv = key.shape[1], key.shape[2], value.shape[-1]
    width = padded_width(d, query.dtype, query.device.type)
    gqa = h != h_kv and mask is None and not (query.is_cuda and query.dtype not in HALF)
    heads = h_kv if gqa else h
    return kernel_for((b, h, tq, width), (b, heads, tk, width), (b, heads, tk, width if dv == d else dv), query.dtype,
                      query.device, mask=mask, dropout=dropout, enable_gqa=gqa)


def flex_wanted(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object,
                dropout: float = 0.0) -> bool:
    """Whether :func:`sdpa_key_bias` takes the flex path: forced by :func:`.flex.use_path` (``flex``:
    always where flex runs; ``sdpa``: never), else (``auto``) where :func:`steered_kernel` is
    ``math`` and the scores are large (more than :data:`CHUNK_QUERIES` query rows and
    :data:`CHUNK_MIN_SCORES` scores). Never with dropout, which flex does not implement."""
    path = FX.current_path()
    if path == "sdpa" or dropout or not FX.supported(query.device, query.dtype):
        return False
    if path == "flex":
        return True
    tq, tk = query.shape[2], key.shape[2]
    if tq <= CHUNK_QUERIES or tq * tk <= CHUNK_MIN_SCORES:
        return False
    mask = None if attention_mask is None else "bool" if attention_mask.dtype == torch.bool else "float"
    return steered_kernel(query, key, value, mask, dropout) == "math"


def sdpa_key_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                  *, scaling: float, coef: torch.Tensor, down: torch.Tensor, is_causal: bool = True,
                  dropout: float = 0.0) -> torch.Tensor:
    """SDPA-convention attention plus the bias ``coef[b, h, (q)] · down[b, k]``; ``(B, Tq, H, Dv)``.

    ``coef``: float ``(B, H)`` or ``(B, H, Tq)``; ``down``: bool ``(B, Tk)``. Through compiled flex
    where :func:`flex_wanted` (falling back to the channels if flex fails to compile), else through
    :func:`sdpa_channels` with :func:`bias_channels`.
    """
    if flex_wanted(query, key, value, attention_mask, dropout):
        tq, tk = query.shape[2], key.shape[2]
        causal = bool(tq > 1 and attention_mask is None and is_causal)
        k, v, dn = (key[:, :, :tq], value[:, :, :tq], down[:, :tq]) if causal and tk > tq else (key, value, down)
        out = FX.attention(query, k, v, attention_mask, scaling=scaling, is_causal=causal, coef=coef, down=dn)
        if out is not None:
            return out.transpose(1, 2).contiguous()
    q_ch, k_ch = bias_channels(coef, down, scaling=scaling, dtype=query.dtype, head_dim=query.shape[-1])
    return sdpa_channels(query, key, value, attention_mask, scaling=scaling, q_channels=q_ch, k_channels=k_ch,
                         is_causal=is_causal, dropout=dropout)


def bias_channels(coef: torch.Tensor, down: torch.Tensor, *, scaling: float, dtype: torch.dtype,
                  head_dim: int, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k channels for the bias ``coef[b, h, q] · down[b, k]``.

    ``coef``: float ``(B, H)`` or ``(B, H, Tq)``; ``down``: bool ``(B, Tk)``. The q side carries
    ``coef / scaling`` split into hi/lo parts, the k side the exact 0/1 indicator once per part.
    """
    if coef.dim() == 2:
        coef = coef[..., None]
    parts = channel_parts(head_dim, dtype, target or down.device.type)
    q_ch = split_parts(coef.double() / scaling, dtype, parts)
    k_ch = down.to(dtype)[..., None].expand(*down.shape, parts)
    return q_ch, k_ch


def additive_bias(coef: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``(B, H, Tq or 1, Tk)`` float64 bias ``coef[b, h, (q)] · down[b, k]``."""
    if coef.dim() == 2:
        coef = coef[..., None]
    return coef.double()[..., None] * down.double()[:, None, None, :]


def bias_mask(bias: torch.Tensor, head_scale: torch.Tensor, attention_mask: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
    """Float mask ``(B, H, Tq, Tk)`` (``Tq`` from the mask, else 1) = head_scale ⊗ bias + mask.

    ``head_scale``: ``(H,)`` or ``(B, H)``; ``bias``: ``(B, Tk)``.
    """
    work = torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 model
    hs = head_scale.to(work)
    hs = hs.view(1, -1, 1, 1) if hs.dim() == 1 else hs.view(hs.shape[0], -1, 1, 1)
    full = hs * bias.to(work)[:, None, None, :]
    return _with_mask(full, attention_mask, dtype, work)


def _with_mask(full: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype,
               work: torch.dtype) -> torch.Tensor:
    if attention_mask is not None:
        tk = full.shape[-1]
        mask = attention_mask[..., :tk]
        if mask.dtype == torch.bool:
            full = full.masked_fill(~mask, torch.finfo(dtype).min)
        else:
            full = full + mask.to(work)
    return full.to(dtype)


def decode_mask_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The dtype of :func:`sdpa_decode_mask`'s float mask for a one-token ``query``, or None where
    decoding goes through :func:`sdpa_channels` instead.

    fp32/fp64 queries take a mask of their own dtype. bf16/fp16 queries take a float32 mask on CPU,
    whose flash kernel adds the mask in its float32 accumulator (so ``log α`` is exact to float32,
    not rounded to 8 or 11 bits). On CUDA they take a mask of their own dtype: a mask of another
    dtype leaves the fused kernels there (the math kernel would upcast the whole KV cache), and the
    channels would copy the KV cache into widened heads every step. That rounds ``head_scale · log α``
    to the dtype: the weight α is off by at most ``|log α| · 2⁻⁸`` relative in bf16 (α = 0.9:
    0.89990 for 0.9, 1.1e-4 of the weight; measured per α in docs/steering.md). Other devices (no
    fused kernel known to take such a mask) keep the channels (None).
    """
    return mask_dtype_for(query.device.type, query.dtype)


def mask_dtype_for(device_type: str, dtype: torch.dtype) -> torch.dtype | None:
    """:func:`decode_mask_dtype`'s decision on a device type and query dtype."""
    if dtype not in HALF:
        return dtype
    if device_type == "cpu":
        return torch.float32
    return dtype if device_type == "cuda" else None


def sdpa_decode_mask(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *, scaling: float, add: torch.Tensor,
                     dropout: float = 0.0) -> torch.Tensor:
    """One query token: SDPA with the float mask ``add + mask`` ``(B, H, 1, Tk)``; ``(B, 1, H, Dv)``.

    The ``n_rep`` query heads sharing a kv head are packed as ``n_rep`` query rows, so keys and
    values are never repeated (and never copied). The mask has :func:`decode_mask_dtype`'s dtype
    (float32 for bf16/fp16 queries: a half-precision mask would round the bias); ``add`` already of
    that dtype, without a padding mask, is passed as is (a view of a longer buffer is fine).
    """
    b, h, tq, d = query.shape
    h_kv, dv = key.shape[1], value.shape[-1]
    n_rep = h // h_kv
    work = torch.promote_types(query.dtype, torch.float32)
    dtype = decode_mask_dtype(query) or query.dtype
    if attention_mask is None and add.dtype == dtype:
        mask = add  # the layer's bias buffer as it is: no copy per step
    else:
        mask = _with_mask(add.to(work), attention_mask, dtype, work)
    mask = mask.expand(b, h, tq, mask.shape[-1])
    if n_rep > 1 and tq == 1:
        q = query.reshape(b, h_kv, n_rep, d)
        mask = mask.reshape(b, h_kv, n_rep, mask.shape[-1])
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        out = out.reshape(b, h, 1, dv)
    else:
        out = F.scaled_dot_product_attention(query, repeat_kv(key, n_rep), repeat_kv(value, n_rep),
                                             attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def sdpa_decode_key_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, *, scaling: float, bias: torch.Tensor,
                         head_scale: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """:func:`sdpa_decode_mask` with the bias ``head_scale[(b,) h] · bias[b, k]``."""
    hs = head_scale if head_scale.dim() == 2 else head_scale[None].expand(bias.shape[0], -1)
    return sdpa_decode_mask(query, key, value, attention_mask, scaling=scaling,
                            add=hs.double()[:, :, None, None] * bias.double()[:, None, None, :], dropout=dropout)


def eager_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, *,
                 scaling: float, softcap: float | None = None) -> torch.Tensor:
    """The eager pre-softmax scores ``(B, H, Tq, Tk)`` (softcapped, masked), in the query dtype."""
    k = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]]
    return scores


def eager_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *, scaling: float, add: torch.Tensor | None,
               scores: torch.Tensor | None = None, dropout: float = 0.0, training: bool = False,
               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention plus ``add`` (broadcastable to the scores); ``(out (B, Tq, H, Dv), probs)``."""
    if scores is None:
        scores = eager_scores(query, key, attention_mask, scaling=scaling, softcap=softcap)
    if add is not None:
        scores = (scores.float() + add.float()) if scores.dtype in HALF else scores + add.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    v = repeat_kv(value, query.shape[1] // value.shape[1])
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


def eager_key_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, *, scaling: float, bias: torch.Tensor,
                   head_scale: torch.Tensor, dropout: float = 0.0, training: bool = False,
                   softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`eager_bias` with ``head_scale[(b,) h] · bias[b, k]``."""
    hs = head_scale if head_scale.dim() == 2 else head_scale[None].expand(bias.shape[0], -1)
    add = hs.double()[:, :, None, None] * bias.double()[:, None, None, :]
    return eager_bias(query, key, value, attention_mask, scaling=scaling, add=add, dropout=dropout,
                      training=training, softcap=softcap)
