"""The plain fused causal attention kernel's output together with its log-sum-exp, per device.

The thin correction (:mod:`.thin`) needs, for an unmasked causal prefill, the plain kernel's output
``O (B, H, T, Dv)`` and each query's log-sum-exp ``L (B, H, T)`` (natural log of
``Σ_k exp(scale · q·k)``). PyTorch's public SDPA does not return ``L``; these private aten ops do
(schemas as registered in torch 2.13, read from ``torch.ops.aten.<op>.default._schema``):

* CPU: ``_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, *, attn_mask,
  scale) -> (output, logsumexp)``: any float dtype, grouped kv heads taken as they are;
* CUDA ``flash`` (fp16/bf16, head dim ≤ 256 and a multiple of 8):
  ``_scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, return_debug_mask, *,
  scale) -> (output, logsumexp (B, H, T), ...)``; the FlashAttention-2 kernel behind it takes
  grouped kv heads (``H % Hkv == 0``) without expanding them, so those are tried first;
* CUDA ``cudnn`` (fp16/bf16): ``_scaled_dot_product_cudnn_attention(q, k, v, attn_bias,
  compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale) -> (output, logsumexp
  (B, H, T[, 1]), ...)``; measured on an H200 (torch 2.11) to give NaN in fp32, so half types only;
* CUDA ``efficient`` (fp16/bf16/fp32): ``_scaled_dot_product_efficient_attention(q, k, v, attn_bias,
  compute_log_sumexp, dropout_p, is_causal, *, scale) -> (output, log_sumexp (B, H, ⌈T/32⌉·32),
  ...)``, the log-sum-exp padded to a multiple of 32 rows.

:func:`candidates` is the decision (which ops, in order, for a device type / dtype / head dim, the
backend plain SDPA would pick first: :func:`sdpa_choice`), :func:`plain_with_lse` runs them: the first op whose result passes a one-time check per signature
wins. The check holds by construction of causal attention: query 0 sees key 0 only, so
``L[:, :, 0] = scale · q₀·k₀`` and ``O[:, :, 0] = v₀`` — it catches a log-sum-exp in another base,
layout or padding. An op that raises, returns other shapes or fails the check is remembered as
failed for that signature (no retry per layer), and None means: use the channels.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .functional import repeat_kv
from .kernels import HALF

logger = logging.getLogger(__name__)

_STATE: dict[tuple, bool] = {}  # (op, expanded, device type, dtype, head dims) -> passed the check
_PREFERRED: dict[tuple, str | None] = {}  # CUDA (dtype, H, Hkv, D, Dv) -> plain SDPA's backend


def candidates(device_type: str, dtype: torch.dtype, head_dim: int, value_dim: int, grouped: bool,
               preferred: str | None = None) -> list[tuple[str, bool]]:
    """``[(op, expand_kv), ...]`` to try, in order, for a causal prefill without a mask.

    ``expand_kv``: whether grouped kv heads are repeated to the query heads first (cuDNN is tried
    with them as they are first too, where it is ``preferred``). ``preferred``: the backend plain
    SDPA picks for these inputs (:func:`sdpa_choice`), whose ops go first, so the steered layer runs
    the plain layer's kernel family (cuDNN on an H200, measured)."""
    out = _candidates(device_type, dtype, head_dim, value_dim, grouped)
    if preferred == "cudnn" and grouped and ("cudnn", True) in out:
        out.insert(out.index(("cudnn", True)), ("cudnn", False))
    if preferred is not None:
        out.sort(key=lambda c: c[0] != preferred)  # stable: the preferred op's tries first, in order
    return out


def sdpa_choice(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> str | None:
    """The fused backend plain causal SDPA would use (``flash``, ``efficient``, ``cudnn``), from
    PyTorch's own dispatcher (``torch._fused_sdp_choice``); None where it says math or is missing."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return None
    from torch.nn.attention import SDPBackend

    try:
        got = int(choose(query, key, value, None, 0.0, True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]))
    except (RuntimeError, TypeError):
        return None
    names = {int(SDPBackend.FLASH_ATTENTION): "flash", int(SDPBackend.EFFICIENT_ATTENTION): "efficient",
             int(SDPBackend.CUDNN_ATTENTION): "cudnn"}
    return names.get(got)


def _candidates(device_type: str, dtype: torch.dtype, head_dim: int, value_dim: int, grouped: bool
                ) -> list[tuple[str, bool]]:
    if device_type == "cpu":
        return [("cpu_flash", False)] if head_dim == value_dim else []
    if device_type != "cuda":
        return []
    out: list[tuple[str, bool]] = []
    if dtype in HALF:
        if head_dim == value_dim and head_dim <= 256 and head_dim % 8 == 0:
            out.append(("flash", False))
            if grouped:
                out.append(("flash", True))
        out.append(("cudnn", grouped))
    if dtype in (*HALF, torch.float32):
        align = 8 if dtype in HALF else 4
        if head_dim % align == 0 and value_dim % align == 0:
            out.append(("efficient", grouped))
    return out


def _call(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    aten = torch.ops.aten
    if op == "cpu_flash":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scaling)[:2]
    if op == "flash":
        r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scaling)
        return r[0], r[1]
    if op == "cudnn":
        r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scaling)
        return r[0], r[1].reshape(*q.shape[:3], -1)[..., 0]
    if op == "efficient":
        r = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True, scale=scaling)
        return r[0], r[1][..., :q.shape[2]]
    raise ValueError(f"unknown log-sum-exp op {op!r}")


def _checked(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             scaling: float) -> bool:
    """Query 0 sees key 0 only: its log-sum-exp is ``scale · q₀·k₀`` and its output ``v₀``."""
    b, h, t, _ = q.shape
    if out.shape != (b, h, t, v.shape[-1]) or lse.shape != (b, h, t):
        return False
    n_rep = h // k.shape[1]
    k0 = repeat_kv(k[:, :, :1], n_rep).double()
    v0 = repeat_kv(v[:, :, :1], n_rep).double()
    want = (q[:, :, :1].double() * k0).sum(-1)[..., 0] * scaling
    tol = 1e-3 if q.dtype in HALF else 1e-5
    lse_ok = torch.allclose(lse[:, :, 0].double(), want, atol=tol * (1 + float(want.abs().max())), rtol=0)
    out_ok = torch.allclose(out[:, :, 0].double(), v0[:, :, 0], atol=tol * 10 * (1 + float(v0.abs().max())), rtol=0)
    return bool(lse_ok and out_ok)


def plain_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                   call: Callable = _call) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """``(O (B, H, T, Dv), L (B, H, T) float32 or float64, op name)`` of plain causal attention, or None.

    ``query (B, H, T, D)``, ``key``/``value`` ``(B, Hkv, T, D|Dv)``: transformers' layout, grouped
    heads not repeated (repeated here only for the ops that need it). ``call`` runs one op (tests
    replace it)."""
    h, h_kv = query.shape[1], key.shape[1]
    grouped = h != h_kv
    dev = query.device.type
    shape = (query.dtype, h, h_kv, query.shape[-1], value.shape[-1])
    preferred = _PREFERRED.get(shape) if dev == "cuda" else None
    if dev == "cuda" and shape not in _PREFERRED:
        preferred = _PREFERRED[shape] = sdpa_choice(query, key, value, scaling)
    for op, expand in candidates(dev, query.dtype, query.shape[-1], value.shape[-1], grouped, preferred):
        sig = (op, expand, query.device.type, query.dtype, query.shape[-1], value.shape[-1])
        if _STATE.get(sig) is False:
            continue
        k, v = (repeat_kv(key, h // h_kv), repeat_kv(value, h // h_kv)) if expand else (key, value)
        try:
            out, lse = call(op, query, k, v, scaling)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            _fail(sig, str(exc))
            continue
        if sig not in _STATE:
            ok = _checked(out, lse, query, key, value, scaling)
            _STATE[sig] = ok
            if not ok:
                _fail(sig, "its output or log-sum-exp failed the first-row check")
                continue
        elif out.shape != (*query.shape[:3], value.shape[-1]) or lse.shape != query.shape[:3]:
            continue
        return out, lse if lse.dtype in (torch.float32, torch.float64) else lse.float(), op
    return None


def _fail(sig: tuple, reason: str) -> None:
    if _STATE.get(sig) is not False:
        logger.info("plain attention with log-sum-exp: %s%s on %s %s is not used (%s)", sig[0],
                    " (kv expanded)" if sig[1] else "", sig[2], str(sig[3]).replace("torch.", ""),
                    reason.strip().splitlines()[0][:200] if reason.strip() else "error")
    _STATE[sig] = False


def reset() -> None:
    """Forget which ops passed or failed (tests)."""
    _STATE.clear()
    _PREFERRED.clear()
