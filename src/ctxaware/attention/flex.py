"""Attention with a rank-one score bias through compiled ``flex_attention``: no ``T × T`` scores.

Where no fused SDPA kernel can take the steered inputs (:func:`~.kernels.kernel_for` says ``math``:
float64 on CUDA, CPU with unequal q/v widths, ...), SDPA would materialise every ``B·H·Tq·Tk``
score. :func:`attention` computes the same output with ``torch.nn.attention.flex_attention``,
compiled once per input signature (``torch.compile(flex_attention, dynamic=False)``), with

* a ``score_mod`` adding ``coef[b, h, q] · down[b, k]`` (the steering bias: ``head_scale · log α``
  on the down-weighted keys, or the target-share rule's per-query ``b_q``) and optionally a
  softcap (``softcap · tanh(score / softcap)``, applied first as in Gemma-2);
* a :class:`~torch.nn.attention.flex_attention.BlockMask`: for plain causal attention computed
  from block indices alone (no mask tensor at all); for a mask transformers built (bool or float,
  e.g. padding or a sliding window, or the model's own ``BlockMask`` when it was loaded with
  ``attn_implementation="flex_attention"``) from that mask as one bool per (query, key) pair
  shared by all heads, which the ``mask_mod`` reads.

Query and key lengths are padded up to a few bucket sizes (:func:`bucket`) so that a run over
many prompt lengths compiles a handful of kernels, not one per length (dynamic-shape compilation
of flex is not robust on CPU in torch 2.13: it fails to compile head dim 256 once shapes went
dynamic). Padded keys are masked out; padded query rows are dropped.

If compilation fails (no C++ compiler, an unsupported dtype such as float64 on CPU, a compiler
bug) or dynamo would fall back to the uncompiled, materialising flex, :func:`attention` logs one
warning for that signature and returns None: the caller falls back to its chunked SDPA path.

Which path steering uses is chosen by :func:`~.functional.sdpa_key_bias` (``auto``), or forced
with :func:`use_path` / the ``CTXAWARE_ATTENTION_PATH`` environment variable (``auto``, ``flex``,
``sdpa``), for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)

BLOCK = 128  # flex_attention's default sparse block size
PATHS = ("auto", "flex", "sdpa")
RECOMPILE_LIMIT = 64  # compiled signatures kept for flex_attention (dynamo's default is 8)

_COMPILED: Callable | None = None
_FAILED: dict[tuple, str] = {}


class Switch:
    """A setting forced per context (:meth:`use`), else read from an environment variable, else ``auto``."""

    def __init__(self, what: str, env: str, choices: tuple[str, ...]) -> None:
        self.what, self.env, self.choices = what, env, choices
        self._var: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"ctxaware_{env.lower()}", default=None)

    def _check(self, value: str, hint: str = "") -> str:
        if value not in self.choices:
            raise ConfigError(f"{self.what} {value!r} is not one of {', '.join(self.choices)}{hint}")
        return value

    def current(self) -> str:
        return self._check(self._var.get() or os.environ.get(self.env) or "auto",
                           f"; set {self.env} to one of them or unset it")

    @contextmanager
    def use(self, value: str) -> Iterator[None]:
        token = self._var.set(self._check(value))
        try:
            yield
        finally:
            self._var.reset(token)


_PATH = Switch("attention path", "CTXAWARE_ATTENTION_PATH", PATHS)


def current_path() -> str:
    """The attention path in force: :func:`use_path`'s, else ``$CTXAWARE_ATTENTION_PATH``, else ``auto``."""
    return _PATH.current()


def use_path(path: str) -> contextlib.AbstractContextManager[None]:
    """Force the steered attention path within the block: ``flex`` (compiled flex_attention
    wherever it compiles), ``sdpa`` (padded channels through SDPA, chunked where only the math
    kernel takes them) or ``auto`` (flex where only the math kernel could run, else the channels)."""
    return _PATH.use(path)


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flex_attention can run these inputs at all (CPU: fp32/fp16/bf16; CUDA: any float but fp64)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return device.type in ("cpu", "cuda", "xpu")


def bucket(n: int) -> int:
    """Padded length: a multiple of :data:`BLOCK`, and above 1024 the next of ``2^k · {1, 1.25, 1.5, 1.75}``."""
    n = max(int(n), 1)
    if n <= 1024:
        return -(-n // BLOCK) * BLOCK
    base = 1 << (n.bit_length() - 1)
    for step in (1.0, 1.25, 1.5, 1.75, 2.0):
        size = int(base * step)
        if size >= n:
            return -(-size // BLOCK) * BLOCK
    raise AssertionError("unreachable")  # pragma: no cover


def _compiled() -> Callable:
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, nq, nk)`` bool block map -> (number of blocks per row, their column indices first)."""
    num = blocks.sum(dim=-1, dtype=torch.int32).contiguous()
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
    return num, idx


def _block_mask(partial: torch.Tensor, full: torch.Tensor, mask_mod: Callable, lengths: tuple[int, int]) -> Any:
    from torch.nn.attention.flex_attention import BlockMask

    p_num, p_idx = _ordered(partial & ~full)
    f_num, f_idx = _ordered(full)
    return BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=lengths)


def causal_blocks(tq: int, tk: int, qp: int, kp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial / full block maps ``(1, 1, qp/128, kp/128)`` of "key ``k ≤`` query ``q``, ``k < tk``, ``q < tq``"
    (top-left aligned, as SDPA's ``is_causal``), computed from block indices alone."""
    q0 = torch.arange(0, qp, BLOCK, device=device)[:, None]
    k0 = torch.arange(0, kp, BLOCK, device=device)[None, :]
    q1, k1 = q0 + BLOCK - 1, k0 + BLOCK - 1
    any_ = (k0 <= q1) & (k0 < tk) & (q0 < tq)
    all_ = (k1 <= q0) & (k1 < tk) & (q1 < tq)
    return any_[None, None], all_[None, None]


def dense_blocks(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial / full block maps ``(B, 1, Q/128, K/128)`` of a bool mask ``(B, 1, Q, K)`` (multiples of 128)."""
    b, _, q, k = allowed.shape
    view = allowed.view(b, 1, q // BLOCK, BLOCK, k // BLOCK, BLOCK)
    return view.any(dim=5).any(dim=3), view.all(dim=5).all(dim=3)


def padded_mask(attention_mask: Any, batch: int, tq: int, tk: int, qp: int, kp: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(allowed bool (B, 1, qp, kp), additive float mask or None)`` from a bool/float mask broadcastable
    to ``(B, 1, tq, tk)`` or a ``BlockMask`` (its ``mask_mod`` evaluated :data:`BLOCK` rows at a time),
    padded with "masked". One byte per (query, key) pair, shared by the heads (SDPA's mask is that
    size too); the additive mask only for float masks."""
    from torch.nn.attention.flex_attention import BlockMask

    allowed = torch.zeros(batch, 1, qp, kp, dtype=torch.bool, device=device)
    additive = None
    if isinstance(attention_mask, BlockMask):
        mod = attention_mask.mask_mod
        tq, tk = min(tq, attention_mask.seq_lengths[0]), min(tk, attention_mask.seq_lengths[1])
        b_idx = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h_idx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        k_idx = torch.arange(tk, device=device).view(1, 1, 1, -1)
        for i0 in range(0, tq, BLOCK):
            i1 = min(tq, i0 + BLOCK)
            q_idx = torch.arange(i0, i1, device=device).view(1, 1, -1, 1)
            allowed[:, :, i0:i1, :tk] = torch.as_tensor(mod(b_idx, h_idx, q_idx, k_idx), device=device)
        return allowed, None
    m = attention_mask[..., :tk]
    if m.dtype == torch.bool:
        allowed[:, :, :tq, :tk] = m
    else:
        allowed[:, :, :tq, :tk] = m > torch.finfo(m.dtype).min / 2
        additive = torch.zeros(batch, 1, qp, kp, dtype=torch.float32, device=device)
        additive[:, :, :tq, :tk] = m
    return allowed, additive


_LAST_MASK: list[Any] = [None]  # (mask object, its arguments, result): every layer of a forward gets the same mask


def _cached_mask(attention_mask: Any, *args: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`padded_mask`, computed once for the mask object all layers of one forward pass share."""
    last = _LAST_MASK[0]
    if last is not None and last[0] is attention_mask and last[1] == args:
        return last[2]
    out = padded_mask(attention_mask, *args)
    _LAST_MASK[0] = (attention_mask, args, out)
    return out


def _pad_len(x: torch.Tensor, size: int, dim: int = 2) -> torch.Tensor:
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return torch.nn.functional.pad(x, pad)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, *,
              scaling: float, is_causal: bool, coef: torch.Tensor | None = None, down: torch.Tensor | None = None,
              softcap: float | None = None) -> torch.Tensor | None:
    """``softmax(scale·q·kᵀ (softcapped) + coef ⊗ down + mask) · v`` as ``(B, H, Tq, Dv)``, or None.

    ``query (B, H, Tq, D)``, ``key``/``value`` ``(B, Hkv, Tk, D|Dv)`` (grouped heads not repeated);
    ``attention_mask``: None (then ``is_causal`` says causal or full), a bool mask broadcastable to
    ``(B, 1, Tq, Tk)`` (True = attend), a float additive mask of that shape, or a ``BlockMask`` (its
    ``mask_mod`` is evaluated into a padded bool mask, :func:`padded_mask`); ``coef``: ``(B, H)`` or
    ``(B, H, Tq)``, ``down``: bool/float ``(B, Tk)``. None when flex cannot run these inputs (logged
    once per signature).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if not supported(query.device, query.dtype):
        return None
    b, h, tq, d = query.shape
    h_kv, tk, dv = key.shape[1], key.shape[2], value.shape[-1]
    kind = "mod" if isinstance(attention_mask, BlockMask) else "causal" if attention_mask is None and is_causal else \
        "none" if attention_mask is None else "bool" if attention_mask.dtype == torch.bool else "float"
    qp, kp = bucket(tq), bucket(tk)
    signature = (query.device.type, query.dtype, b, h, h_kv, qp, kp, d, dv, kind, coef is not None, softcap)
    if signature in _FAILED:
        return None

    work = torch.float32
    bias_q = bias_k = None
    if coef is not None:
        c = coef if coef.dim() == 3 else coef[..., None].expand(b, h, tq)
        bias_q = _pad_len(c.to(work).expand(b, h, tq), qp).contiguous()
        bias_k = _pad_len(down.to(work).expand(b, tk), kp, dim=1).contiguous()

    allowed = additive = None
    if kind in ("mod", "bool", "float"):
        allowed, additive = _cached_mask(attention_mask, b, tq, tk, qp, kp, query.device)
    # lengths as tensors, so that the kernel compiled for a bucket serves every length in it
    n_q, n_k = (torch.tensor(x, device=query.device) for x in (tq, tk))

    def score_mod(score, bi, hi, qi, ki):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if bias_q is not None:
            score = score + bias_q[bi, hi, qi] * bias_k[bi, ki]
        if additive is not None:
            score = score + additive[bi, 0, qi, ki]
        return score

    if allowed is not None:
        def mask_mod(bi, hi, qi, ki):
            return allowed[bi, 0, qi, ki]

        blocks = dense_blocks(allowed)
    else:
        causal = kind == "causal"

        def mask_mod(bi, hi, qi, ki):
            ok = (ki < n_k) & (qi < n_q)
            return ok & (ki <= qi) if causal else ok

        if causal:
            blocks = causal_blocks(tq, tk, qp, kp, query.device)
        else:
            q0 = torch.arange(0, qp, BLOCK, device=query.device)[:, None]
            k0 = torch.arange(0, kp, BLOCK, device=query.device)[None, :]
            blocks = (((k0 < tk) & (q0 < tq))[None, None], ((k0 + BLOCK <= tk) & (q0 + BLOCK <= tq))[None, None])
    block_mask = _block_mask(*blocks, mask_mod, (qp, kp))

    q, k, v = _pad_len(query, qp), _pad_len(key, kp), _pad_len(value, kp)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            out = _compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                              enable_gqa=h != h_kv)
    except Exception as exc:  # noqa: BLE001 - any compile/lowering failure means: use the fallback
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        _FAILED[signature] = reason
        logger.warning("compiled flex_attention failed for %s %s head dim %d (%s); falling back to chunked SDPA",
                       query.device.type, str(query.dtype).replace("torch.", ""), d, reason)
        return None
    return out[:, :, :tq]


def failures() -> dict[tuple, str]:
    """The signatures flex failed to compile for in this process, with the first line of the error."""
    return dict(_FAILED)
