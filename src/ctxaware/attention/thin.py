"""Steered prefill as a correction of the plain kernel's output over a few down-weighted keys.

In a chat prompt steered toward the user's turn, the down-weighted keys ``D`` are the system prompt
and the template tokens: tens of keys against thousands. With the plain causal attention's output
``O`` and log-sum-exp ``L`` (one fused call at the model's own head width, :mod:`.lse`: CPU flash,
or CUDA flash / cuDNN / memory-efficient), the mass ``m_D = Σ_{k∈D} p_k`` and
``P_D V_D = Σ_{k∈D} p_k v_k`` (``p_k = exp(s_k − L)``) come from a thin ``Tq × |D|`` product, and
the steered output is exactly

    O' = (O − (1 − α) P_D V_D) / (1 − (1 − α) m_D)

(multiplying the down keys' weights by α and renormalising, per query row and head), computed by
:mod:`.fused` (eager ops or one compiled pass). The denominator ``den`` is at least α and divides the
rounding of ``O`` (the kernel's output, in the model's dtype) by it:

* fp32/fp64 on CPU: taken for α ≥ :data:`MIN_ALPHA` (measured: at most 1.65× plain's own error at α = 0.5);
* fp16/bf16: taken for α ≥ :data:`HALF_MIN_ALPHA` (the kernel's output is rounded to 8 or 11 bits).
  Measured against float64 on CPU (tests/test_thin.py, inputs with a strong attention sink among the
  down keys): the largest error relative to the output's scale is then at most 2.0× plain
  attention's own (1.0–1.5× without a sink); at α = 0.7 it reaches 2.3×, at 0.5 3×. Below it (small
  α in half precision) the channels run. CUDA fp32 takes the same bound: the H200 probe measured
  2.8× plain's error at α = 0.5 with the memory-efficient kernel's log-sum-exp. On CPU, half types
  take it too (:data:`CPU_HALF`): a whole-model bf16 prefill at 2k measured 0.968–0.984 of plain
  with it against 0.947–0.961 with the 66-wide channels (docs/steering.md).

Always: a causal prefill (``Tq = Tk``) without a padding mask, the fixed-α rule, the ``auto`` path,
at most :data:`MAX_DOWN_FRACTION` of the keys down-weighted, and a device/dtype/head dim some
log-sum-exp op takes (:func:`.lse.candidates`). Everything else goes through the padded channels
(:mod:`.functional`). :func:`gate` is that decision on plain numbers (testable for any device).
"""

from __future__ import annotations

import math

import torch

from . import flex as FX
from . import fused as FU
from . import lse as LS
from .functional import repeat_kv
from .kernels import HALF

MIN_ALPHA = 0.5  # smallest α (largest down-weighting) taken through the correction
HALF_MIN_ALPHA = 0.8  # fp16/bf16: smallest α taken (error within 2x plain's, measured)
MAX_DOWN_FRACTION = 1 / 32  # most down-weighted keys, as a fraction of the keys
CHUNK_ROWS = 8192  # query rows corrected at a time (bounds the work-dtype temporaries)
CPU_HALF = True  # bf16/fp16 on CPU too: whole-model prefill measured faster than the channels (docs/steering.md)
_MIN_COEF = math.log(MIN_ALPHA)
_HALF_MIN_COEF = math.log(HALF_MIN_ALPHA)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def gate(*, device_type: str, dtype: torch.dtype, tq: int, tk: int, head_dim: int, value_dim: int, grouped: bool,
         coef_min: float, coef_max: float, n_down: int, fixed_alpha: bool = True, masked: bool = False,
         causal: bool = True, dropout: float = 0.0, path: str = "auto") -> bool:
    """Whether a steered call with these properties goes through the correction: the whole decision,
    on numbers only (``coef_min``/``coef_max``: range of ``log α`` over rows and heads)."""
    if path != "auto" or dropout or masked or not causal or not fixed_alpha:
        return False
    if dtype not in DTYPES or (dtype == torch.float64 and device_type != "cpu"):
        return False
    if dtype in HALF and device_type == "cpu" and not CPU_HALF:
        return False
    if not LS.candidates(device_type, dtype, head_dim, value_dim, grouped):
        return False
    if tq != tk or tq < 2:
        return False
    strict = dtype in HALF or device_type != "cpu"
    if coef_min < (_HALF_MIN_COEF if strict else _MIN_COEF) or coef_max > 0.0:
        return False
    return n_down <= tk * MAX_DOWN_FRACTION


def wanted(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object, *,
           coef: torch.Tensor, down: torch.Tensor, is_causal: bool, dropout: float = 0.0,
           coef_range: tuple[float, float] | None = None, n_down: int | None = None) -> bool:
    """Whether the steered call ``(query, key, value, coef, down)`` goes through :func:`attention`.

    ``coef_range`` (min, max of ``coef``) and ``n_down`` (most down keys of a row), when the caller
    has them (the plan does, without reading the device), save reading them from ``coef``/``down``."""
    fixed = coef.dim() == 2
    if fixed and coef_range is None:
        coef_range = (float(coef.min()), float(coef.max()))
    lo, hi = coef_range if fixed else (0.0, 0.0)
    return gate(device_type=query.device.type, dtype=query.dtype, tq=query.shape[2], tk=key.shape[2],
                head_dim=query.shape[-1], value_dim=value.shape[-1], grouped=query.shape[1] != key.shape[1],
                coef_min=lo, coef_max=hi, n_down=int(down.sum(-1).max()) if n_down is None else n_down,
                fixed_alpha=fixed, masked=attention_mask is not None, causal=is_causal, dropout=dropout,
                path=FX.current_path())


def down_index(down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(idx, pos, n)`` of bool ``down (B, T)``: ``idx (B, n)`` each row's down keys in position order,
    padded to the longest row ``n``; ``pos``: the same positions with padding set to ``T`` (after every
    query, so the correction ignores it)."""
    b, t = down.shape
    counts = down.sum(-1)
    n = int(counts.max()) if b else 0
    idx = torch.argsort((~down).to(torch.int8), dim=-1, stable=True)[:, :n]
    valid = torch.arange(n, device=down.device)[None, :] < counts[:, None]
    pos = torch.where(valid, idx, torch.full_like(idx, t))
    return idx, pos, n


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float, coef: torch.Tensor,
              down: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor, int] | None = None,
              mode: str | None = None) -> torch.Tensor | None:
    """The steered causal attention ``(B, Tq, H, Dv)`` (transformers' layout), or None where no kernel
    gives its log-sum-exp.

    ``query (B, H, T, D)``, ``key``/``value`` ``(B, Hkv, T, D)``; ``coef``: float ``(B, H)``
    ``log α`` per row and head; ``down``: bool ``(B, T)``; ``index``: :func:`down_index` of ``down``
    (computed here when not given); ``mode``: :mod:`.fused`'s (default: its current mode).
    """
    got = LS.plain_with_lse(query, key, value, scaling)
    if got is None:
        return None
    out, lse, _ = got
    b, h, t, _ = query.shape
    h_kv, d, dv = key.shape[1], key.shape[-1], value.shape[-1]
    idx, pos, nd = index if index is not None else down_index(down)
    if nd == 0:
        return out.transpose(1, 2).contiguous()
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    n_rep = h // h_kv
    kd = key.gather(2, idx[:, None, :, None].expand(b, h_kv, nd, d)).to(work).mul_(scaling)
    vd = value.gather(2, idx[:, None, :, None].expand(b, h_kv, nd, dv)).to(work)
    keep = (-torch.expm1(coef.double())).to(work)  # 1 − α per row and head
    kd, vd = repeat_kv(kd, n_rep), repeat_kv(vd, n_rep)
    if t <= CHUNK_ROWS:
        return FU.correct(out, lse, query, kd, vd, pos, keep, mode=mode)[0]
    res = torch.empty(b, t, h, dv, dtype=out.dtype, device=out.device)
    for a in range(0, t, CHUNK_ROWS):  # bounded work-dtype temporaries; positions relative to the chunk
        z = min(t, a + CHUNK_ROWS)
        res[:, a:z] = FU.correct(out[:, :, a:z], lse[:, :, a:z], query[:, :, a:z], kd, vd, pos - a, keep, mode=mode)[0]
    return res
