"""Bias plans and the per-context registry that the registered attention functions read.

A :class:`KeyBiasPlan` says what one ``steer()`` / ``steer_rows()`` block adds to the attention
scores of one model, row by row of the batch: ``head_scale[layer][b, h] · bias[b, k]`` with
``bias[b, k] = log α_b`` on the prompt keys row ``b`` does not emphasise (0 elsewhere, and 0 on the
whole row when it is unsteered). Under the target-share rule (``share[b]`` set) the bias is
computed per query instead (see :mod:`.share`).

Plans live in a :class:`contextvars.ContextVar`, so each thread (and each asyncio task) sees only
the plans it opened: two threads steering one model with different prompts never see each
other's plan. Within one context plans stack (nested blocks); the innermost plan that covers a
model's config wins.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..errors import SteeringError

DECODE_SLACK = 256  # keys a decoding step's bias buffer is built ahead of the cache
MASK_ALIGN = 16  # on CUDA the buffer's row length is a multiple of this (the memory-efficient kernel's mask stride)

_PLANS: ContextVar[tuple[tuple[frozenset, "KeyBiasPlan"], ...]] = ContextVar("ctxaware_plans", default=())


@dataclass(eq=False)
class KeyBiasPlan:
    """What to add during the forward passes of one model, per batch row.

    ``emphasis``: bool ``(B, P)`` aligned to the padded prompt (True = emphasised key);
    ``log_alpha``: float64 ``(B,)`` bias of each row's other prompt keys (0 = unsteered row);
    ``head_scale``: ``{layer: (B, H) float32}`` for the steered layers only (0 for heads a row does
    not steer); ``share``: None, or float64 ``(B,)`` target shares (NaN = row not under that rule).
    ``reached`` collects the layers the attention functions applied the plan to.
    """

    emphasis: torch.Tensor
    log_alpha: torch.Tensor
    head_scale: dict[int, torch.Tensor]
    share: torch.Tensor | None = None
    share_floor: float = -30.0
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    kv_offsets: dict[int, int] = field(default_factory=dict, repr=False)
    reached: set[int] = field(default_factory=set, repr=False)

    @property
    def rows(self) -> int:
        return int(self.emphasis.shape[0])

    def kv_offset(self, sliding_window: Any) -> int:
        """Absolute position of the first key of a layer with this window (0 for full attention)."""
        if not sliding_window:
            return 0
        return self.kv_offsets.get(int(sliding_window), 0)

    def _check_batch(self, batch: int) -> None:
        b0 = self.rows
        if batch != b0 and (b0 == 0 or batch % b0):
            raise SteeringError(f"steering was set up for a batch of {b0} prompt(s) but the model ran a batch "
                                f"of {batch}; pass one emphasis row per batch row")

    def _rows(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        self._check_batch(batch)
        return x if batch == self.rows else x.repeat_interleave(batch // self.rows, dim=0)

    def scale_for(self, layer: int | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """``(batch, H)`` float32 head multipliers of ``layer`` on ``device`` (None: layer not steered)."""
        if layer is None or layer not in self.head_scale:
            return None
        key = ("scale", layer, batch, device)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = self._rows(self.head_scale[layer], batch).to(device)
        return out

    def down(self, kv_length: int, batch: int, device: torch.device, offset: int = 0) -> torch.Tensor:
        """Bool ``(batch, kv_length)``: the down-weighted keys (prompt keys outside the emphasis)."""
        key = ("down", (kv_length, offset), batch, device)
        out = self._cache.get(key)
        if out is None:
            self._evict("down", (kv_length, offset))
            emph = self._rows(self.emphasis, batch).to(device)
            n = max(0, min(emph.shape[1], offset + kv_length) - offset)
            out = torch.zeros(batch, kv_length, dtype=torch.bool, device=device)
            out[:, :n] = ~emph[:, offset:offset + n]
            self._cache[key] = out
        return out

    def emphasised(self, kv_length: int, batch: int, device: torch.device, offset: int = 0) -> torch.Tensor:
        """Bool ``(batch, kv_length)``: the emphasised prompt keys."""
        emph = self._rows(self.emphasis, batch).to(device)
        n = max(0, min(emph.shape[1], offset + kv_length) - offset)
        out = torch.zeros(batch, kv_length, dtype=torch.bool, device=device)
        out[:, :n] = emph[:, offset:offset + n]
        return out

    def row_log_alpha(self, batch: int, device: torch.device) -> torch.Tensor:
        """float64 ``(batch,)`` log α of each row (0 for unsteered rows), built once per batch and device."""
        key = ("log_alpha", batch, device)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = self._rows(self.log_alpha, batch).to(device)
        return out

    def coef_range(self, layer: int) -> tuple[float, float]:
        """``(min, max)`` of the fixed-α coefficient ``head_scale · log α`` of ``layer`` over rows and
        heads, from the plan's own tensors (no read of a device tensor per layer call)."""
        key = ("coef_range", layer)
        out = self._cache.get(key)
        if out is None:
            coef = self.head_scale[layer].double().cpu() * self.log_alpha.double().cpu()[:, None]
            out = self._cache[key] = (float(coef.min()), float(coef.max())) if coef.numel() else (0.0, 0.0)
        return out

    def down_index(self, kv_length: int, batch: int, device: torch.device, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """:func:`.thin.down_index` of :meth:`down`: built once per forward pass (every layer of the
        same key range reuses it), not once per layer."""
        from .thin import down_index

        key = ("down_index", (kv_length, offset), batch, device)
        out = self._cache.get(key)
        if out is None:
            self._evict("down_index", (kv_length, offset))
            out = self._cache[key] = down_index(self.down(kv_length, batch, device, offset))
        return out

    def row_share(self, batch: int, device: torch.device) -> torch.Tensor | None:
        return None if self.share is None else self._rows(self.share, batch).to(device)

    def bias(self, kv_length: int, batch: int, device: torch.device, offset: int = 0) -> torch.Tensor:
        """float64 ``(batch, kv_length)`` fixed-α bias of the keys at ``offset .. offset+kv_length-1``."""
        key = ("bias", (kv_length, offset), batch, device)
        out = self._cache.get(key)
        if out is None:
            self._evict("bias", (kv_length, offset))
            down = self.down(kv_length, batch, device, offset)
            la = self.row_log_alpha(batch, device)[:, None].expand_as(down)
            out = self._cache[key] = torch.where(down, la, torch.zeros((), dtype=la.dtype, device=device))
        return out

    def decode_bias(self, layer: int, kv_length: int, batch: int, device: torch.device, dtype: torch.dtype,
                    build: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``(batch, H, 1, kv_length)`` fixed-α bias of a decoding step, in ``dtype``: a view of a
        per-layer buffer ``build(n)`` (the bias of the first ``n`` keys) made :data:`DECODE_SLACK`
        keys ahead (on CUDA rounded up to :data:`MASK_ALIGN`), so the steps that follow (one key
        longer each) build nothing. Keys past the prompt
        get 0, so a longer buffer's prefix is the shorter bias exactly. Full-attention layers only
        (key offset 0)."""
        key = ("decode", layer, batch, device, dtype)
        buf = self._cache.get(key)
        if buf is None or buf.shape[-1] < kv_length:
            size, align = kv_length + DECODE_SLACK, MASK_ALIGN if device.type == "cuda" else 1
            size = -(-size // align) * align
            buf = self._cache[key] = build(size).to(dtype)
        return buf[..., :kv_length]

    def _evict(self, kind: str, size: tuple[int, int]) -> None:
        """Drop cached tensors of other key ranges (decoding grows the length by one per step); the
        ranges of full and of sliding-window layers alternate, so keep two."""
        stale = [k for k in self._cache if k[0] == kind and k[1] != size]
        for k in stale[:-1]:
            del self._cache[k]

    def clear(self) -> None:
        self._cache.clear()
        self.kv_offsets.clear()


def push_plan(configs: Iterable[Any], plan: KeyBiasPlan) -> None:
    """Make ``plan`` the innermost plan of these configs in the current context."""
    _PLANS.set(_PLANS.get() + ((frozenset(id(c) for c in configs), plan),))


def pop_plan(configs: Iterable[Any], plan: KeyBiasPlan) -> None:
    """Remove ``plan`` from the current context (whatever was pushed after it stays)."""
    _PLANS.set(tuple(entry for entry in _PLANS.get() if entry[1] is not plan))
    plan.clear()


def active_plans() -> int:
    """Number of configs with an active plan in the current context (0 outside any steering block)."""
    ids: set[int] = set()
    for cfg_ids, _ in _PLANS.get():
        ids |= cfg_ids
    return len(ids)


def plan_for_config(config: Any) -> KeyBiasPlan | None:
    """The innermost plan of the current context covering ``config`` (None when there is none)."""
    key = id(config)
    for cfg_ids, plan in reversed(_PLANS.get()):
        if key in cfg_ids:
            return plan
    return None
