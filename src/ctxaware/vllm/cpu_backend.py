"""The ``CPU_ATTN`` override: vLLM's CPU attention, with the rows of steered requests made exact.

Registered by :func:`ctxaware.vllm.plugin.register` through
``vllm.v1.attention.backends.registry.register_backend(AttentionBackendEnum.CPU_ATTN, ...)`` — the
CPU platform always selects that backend. The subclass keeps vLLM's metadata builder, KV-cache
writes and C++ kernel for every request; after the kernel ran, the output rows of the steered
requests of the batch (:func:`ctxaware.vllm.batch.current_batch`) are recomputed with the steering
bias from the layer's paged K/V (:mod:`.paged`, :mod:`.steered`):

* unsteered requests: vLLM's output, untouched (no steered request in the batch: zero extra work);
* prefill, chunked prefill and prefix-cached prompts: the query rows of this step attend to every
  cached key of the request (``seq_len`` keys, positions from ``seq_len − query_len``);
* decoding: all steered requests of the step in one padded computation per layer, their logical K/V
  kept per layer across steps while the group is unchanged (one appended row per step);
* GQA, sliding-window layers and softcap as the native kernel; alibi, attention sinks, fp8 KV
  caches and encoder attention cannot be steered and raise.

The per-step plan (which rows, which blocks) is built once per forward pass and shared by the layers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from . import batch as B
from .paged import block_layout, gather
from .steered import steered_attention

logger = logging.getLogger(__name__)
_PLAN: dict[str, Any] = {"meta": None, "version": -1, "groups": None}
DECODE_ROWS = 1  # requests with at most this many query rows in the step are batched together
# Decoding: per layer, the logical K/V of the steered decode group, kept across steps while the group
# stays the same (one new row per request and step instead of re-reading every block); bounded here.
_DECODE: dict[int, dict[str, Any]] = {}
DECODE_CACHE_MB = float(os.environ.get("CTXAWARE_VLLM_DECODE_CACHE_MB", "2048"))
HEADROOM = 64  # tokens of room added when a decode buffer is (re)built


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no distributed group (unit use)
        return 0


def _groups(meta: Any, steered: dict[int, B.RequestSteering]) -> list[dict[str, Any]]:
    """Batched work units: all steered decode requests together, each longer query alone."""
    qsl = meta.query_start_loc.tolist()
    seq = meta.seq_lens.tolist()
    n = len(seq)
    rows = [(i, qsl[i], qsl[i + 1] - qsl[i], seq[i], st) for i, st in sorted(steered.items()) if i < n
            and qsl[i + 1] > qsl[i]]
    decode = [r for r in rows if r[2] <= DECODE_ROWS]
    units = ([decode] if decode else []) + [[r] for r in rows if r[2] > DECODE_ROWS]
    groups = []
    for unit in units:
        qmax = max(r[2] for r in unit)
        smax = max(r[3] for r in unit)
        tok = torch.zeros(len(unit), qmax, dtype=torch.long)
        valid = torch.zeros(len(unit), qmax, dtype=torch.bool)
        pos = torch.zeros(len(unit), qmax, dtype=torch.long)
        down = torch.zeros(len(unit), smax, dtype=torch.bool)
        for j, (_, start, ql, sl, st) in enumerate(unit):
            tok[j, :ql] = torch.arange(start, start + ql)
            valid[j, :ql] = True
            pos[j, :ql] = torch.arange(sl - ql, sl)
            p = min(len(st.down), smax)
            down[j, :p] = st.down[:p]
        steer = [r[4] for r in unit]
        groups.append({"index": torch.tensor([r[0] for r in unit]), "tok": tok, "valid": valid, "pos": pos,
                       "kv_len": torch.tensor([r[3] for r in unit]), "smax": smax, "down": down,
                       "steer": steer, "decode": qmax == 1, "serials": tuple(st.serial for st in steer),
                       "coef": torch.stack([st.coef for st in steer], dim=1),  # (layers, R, heads)
                       "rows": tok[valid], "every_layer": frozenset.intersection(*(st.layers for st in steer))})
    return groups


def _plan(meta: Any) -> list[dict[str, Any]]:
    version = B.batch_version()
    if _PLAN["meta"] is not meta or _PLAN["version"] != version:
        _PLAN.update(meta=meta, version=version, groups=_groups(meta, B.current_batch()))
    return _PLAN["groups"]


class SteeredCPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention plus exact steered rows (see the module docstring)."""

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        if attn_metadata is None or not B.current_batch() or self.attn_type != AttentionType.DECODER:
            if not B.current_batch():
                _DECODE.clear()
            return output
        layer_index = self._layer_index(layer)
        groups = [g for g in _plan(attn_metadata) if any(layer_index in st.layers for st in g["steer"])]
        if groups:
            self._steer(layer, layer_index, query, key, value, kv_cache, attn_metadata, output, groups)
        return output

    def _layer_index(self, layer: Any) -> int:
        index = getattr(self, "_ctxaware_layer", None)
        if index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            index = self._ctxaware_layer = extract_layer_index(layer.layer_name)
        return index

    def _refuse(self) -> None:
        what = ("alibi slopes" if self.alibi_slopes is not None else "attention sinks" if self.sinks is not None
                else "an fp8 KV cache" if self.is_fp8_kv_cache else None)
        if what:
            raise RuntimeError(f"ctxaware: this layer uses {what}, which the steered path does not implement; "
                               "send this model's requests unsteered")

    def _kv(self, layer: Any, layer_index: int, key: Any, value: Any, kv_cache: torch.Tensor, meta: Any,
            g: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical (R, Hkv, S', D) K/V of a group (S' ≥ its longest request; keys past kv_len are masked)."""
        num_blocks, hkv, block_size, _ = kv_cache.shape
        d = self.head_size
        buf = _DECODE.get(layer_index) if g["decode"] else None
        if (buf is not None and key is not None and buf["serials"] == g["serials"] and buf["cap"] >= g["smax"]
                and torch.equal(buf["len"], g["kv_len"] - 1)):
            rows, at = g["tok"][:, 0], g["kv_len"] - 1  # this step's token of each request, its position
            ar = torch.arange(len(rows))
            buf["k"][ar, :, at] = key.view(key.shape[0], hkv, d)[rows].to(buf["k"].dtype)
            buf["v"][ar, :, at] = value.view(value.shape[0], hkv, -1)[rows].to(buf["v"].dtype)
            buf["len"] = g["kv_len"].clone()
            return buf["k"], buf["v"]
        halves = kv_cache.view(num_blocks, hkv, block_size * 2, d).chunk(2, dim=2)
        k_index, v_index = block_layout(layer.isa, block_size, d, kv_cache.dtype)
        nb = -(-g["smax"] // block_size)
        table = meta.block_table[g["index"], :nb].long()
        k = gather(halves[0], k_index, table, g["smax"])
        v = gather(halves[1], v_index, table, g["smax"])
        if g["decode"]:
            cap = g["smax"] + HEADROOM
            layers = max(1, g["steer"][0].coef.shape[0])
            if k.element_size() * k.shape[0] * hkv * cap * d * 2 * layers <= DECODE_CACHE_MB * 2 ** 20:
                pad = (0, 0, 0, cap - g["smax"])
                k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
                _DECODE[layer_index] = {"serials": g["serials"], "cap": cap, "len": g["kv_len"].clone(),
                                        "k": k, "v": v}
        return k, v

    def _steer(self, layer: Any, layer_index: int, query: torch.Tensor, key: Any, value: Any,
               kv_cache: torch.Tensor, meta: Any, output: torch.Tensor, groups: list[dict[str, Any]]) -> None:
        self._refuse()
        d = self.head_size
        h0 = _tp_rank() * self.num_heads
        out = output.view(output.shape[0], self.num_heads, d)
        for g in groups:
            k, v = self._kv(layer, layer_index, key, value, kv_cache, meta, g)
            down = g["down"]
            if k.shape[2] > down.shape[1]:
                down = torch.nn.functional.pad(down, (0, k.shape[2] - down.shape[1]))
            q = query[g["tok"]].view(*g["tok"].shape, self.num_heads, d)
            coef = g["coef"][layer_index, :, h0:h0 + self.num_heads]
            rows = steered_attention(q, k, v, q_pos=g["pos"], kv_len=g["kv_len"], coef=coef, down=down,
                                     scale=self.scale, softcap=float(self.logits_soft_cap or 0.0),
                                     window=self.sliding_window)
            if layer_index in g["every_layer"]:  # the common case: every request of the group steers this layer
                out[g["rows"]] = rows[g["valid"]].to(out.dtype)
                continue
            here = torch.tensor([layer_index in st.layers for st in g["steer"]])
            keep = g["valid"] & here[:, None]
            out[g["tok"][keep]] = rows[keep].to(out.dtype)


class SteeredCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with ctxaware's steered rows (same name, builder and cache layout)."""

    @staticmethod
    def get_impl_cls() -> type[SteeredCPUAttentionImpl]:
        return SteeredCPUAttentionImpl
