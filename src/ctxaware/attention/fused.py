"""The thin correction's arithmetic, eager or as one compiled pass (C++ on CPU, Triton on CUDA).

Given the plain kernel's output ``O`` and log-sum-exp ``L`` and the down-weighted keys' ``k_D, v_D``
(:mod:`.thin` gathers them), :func:`correct` returns

    O' = (O − (1 − α) P_D V_D) / (1 − (1 − α) m_D),   p_k = exp(scale · q·k_k − L) (0 for a key after the query)

and the smallest denominator (the worst amplification of ``O``'s rounding is its inverse). All
arithmetic is in a work dtype (float32, or float64 for a float64 model): half-precision inputs are
read once and the result rounded once.

* ``eager``: PyTorch ops, in place where possible (the thin ``T × |D|`` products, one work-dtype copy
  of the output's size);
* ``compiled``: the same formula through ``torch.compile(dynamic=True)``: the casts, the exponent,
  the denominator and the final combination fuse around the two thin matmuls, with no full-size
  work-dtype copies of ``q`` or ``O``. Shapes are dynamic, so prompts of other lengths or other
  numbers of down keys reuse the compiled code (tested); the first call compiles (seconds).

Which one runs: :func:`use_mode` / ``$CTXAWARE_THIN_CORRECTION`` (``auto``, ``compiled``, ``eager``);
``auto`` compiles on CUDA for calls of at least :data:`COMPILE_MIN_ROWS` query rows × heads and stays
eager on CPU, where the compiled pass was measured no faster (docs/steering.md). If compiling fails
(no C++ compiler, no Triton, a compiler error), one warning is logged and the eager ops serve every
later call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

from .flex import Switch

logger = logging.getLogger(__name__)

MODES = ("auto", "compiled", "eager")
COMPILE_MIN_ROWS = 16384  # query rows × heads from which auto compiles (where it compiles at all)
AUTO_COMPILED_DEVICES = ("cuda",)

_MODE = Switch("thin correction mode", "CTXAWARE_THIN_CORRECTION", MODES)
_COMPILED: dict[str, Callable] = {}
_FAILED: dict[str, str] = {}
_COMPILE_SECONDS: dict[str, float] = {}


def current_mode() -> str:
    """The correction mode in force: :func:`use_mode`'s, else ``$CTXAWARE_THIN_CORRECTION``, else ``auto``."""
    return _MODE.current()


def use_mode(mode: str) -> contextlib.AbstractContextManager[None]:
    """Force the correction's implementation within the block (``compiled``, ``eager`` or ``auto``)."""
    return _MODE.use(mode)


def chosen(device_type: str, rows: int, mode: str | None = None) -> str:
    """``"compiled"`` or ``"eager"`` for a call of ``rows`` query rows × heads on ``device_type``."""
    mode = mode or current_mode()
    if mode == "eager" or device_type in _FAILED:
        return "eager"
    if mode == "compiled":
        return "compiled"
    return "compiled" if device_type in AUTO_COMPILED_DEVICES and rows >= COMPILE_MIN_ROWS else "eager"


def correction(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor,
               pos: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula as plain functional ops (what is compiled; see :func:`correct` for the arguments)."""
    work = kd.dtype
    t = query.shape[2]
    s = torch.matmul(query.to(work), kd.transpose(-1, -2)) - lse.to(work)[..., None]
    later = pos[:, None, None, :] > torch.arange(t, device=query.device)[None, None, :, None]
    p = torch.exp(s).masked_fill(later, 0.0)
    c = keep[:, :, None, None]
    den = 1.0 - c * p.sum(-1, keepdim=True)
    res = (out.to(work) - c * torch.matmul(p, vd)) / den
    return res.transpose(1, 2).to(out.dtype).contiguous(), den.amin()


def eager(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor,
          pos: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`correction` with in-place PyTorch ops (fewer temporaries)."""
    work = kd.dtype
    b, h, t, dv = out.shape
    p = torch.matmul(query if query.dtype == work else query.to(work), kd.transpose(-1, -2))  # (B, H, T, n)
    p.sub_(lse[..., None].to(work))
    later = pos[:, None, :] > torch.arange(t, device=pos.device)[None, :, None]  # (B, T, n): key after query
    p.masked_fill_(later[:, None], float("-inf")).exp_()
    c = keep[:, :, None, None]
    inv_den = p.sum(-1, keepdim=True).mul_(-c).add_(1)
    den_min = inv_den.amin()
    inv_den.reciprocal_()
    p.mul_(inv_den * -c)
    corr = torch.matmul(p, vd)  # −(1 − α) P_D V_D / den
    res = torch.empty(b, t, h, dv, dtype=out.dtype, device=out.device)
    if out.dtype == work:
        torch.addcmul(corr.transpose(1, 2), out.transpose(1, 2), inv_den.transpose(1, 2), out=res)
    else:
        res.copy_(corr.addcmul_(out, inv_den).transpose(1, 2))
    return res, den_min


def _compiled(device_type: str) -> Callable:
    fn = _COMPILED.get(device_type)
    if fn is None:
        fn = _COMPILED[device_type] = torch.compile(correction, dynamic=True)
    return fn


def correct(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor,
            pos: torch.Tensor, keep: torch.Tensor, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(O' (B, T, H, Dv) contiguous in O's dtype, smallest denominator (0-d, work dtype), how)``.

    ``out (B, H, T, Dv)``: the plain output; ``lse (B, H, T)``: its log-sum-exp; ``query (B, H, T, D)``;
    ``kd (B, H, n, D)``: the down keys times the softmax scale, ``vd (B, H, n, Dv)``, both in the work
    dtype (per query head); ``pos (B, n)`` int64: each down key's position (``T`` or more for padding,
    which every query then ignores); ``keep (B, H)``: ``1 − α`` in the work dtype. ``how``:
    ``"compiled"`` or ``"eager"``, what ran.
    """
    dev = out.device.type
    how = chosen(dev, out.shape[1] * out.shape[2], mode)
    if how == "compiled":
        first = dev not in _COMPILE_SECONDS
        t0 = time.perf_counter()
        try:
            res, den_min = _compiled(dev)(out, lse, query, kd, vd, pos, keep)
        except Exception as exc:  # noqa: BLE001 - any compile failure means: the eager ops
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            _FAILED[dev] = reason
            logger.warning("torch.compile of the thin correction failed on %s (%s); using eager ops from now on",
                           dev, reason)
        else:
            if first:
                _COMPILE_SECONDS[dev] = time.perf_counter() - t0
            return res, den_min, how
    res, den_min = eager(out, lse, query, kd, vd, pos, keep)
    return res, den_min, "eager"


def compile_seconds() -> dict[str, float]:
    """Seconds the first compiled call took per device type in this process (compile included)."""
    return dict(_COMPILE_SECONDS)


def failures() -> dict[str, str]:
    """Device types the compiled correction failed on in this process, with the first line of the error."""
    return dict(_FAILED)
