"""Reading K/V back from vLLM's paged CPU cache, whatever layout the kernel stores a block in.

vLLM's CPU attention writes each block with ``cpu_attn_reshape_and_cache``, whose in-block layout
depends on the instruction set it picked (``vec``/``vec16`` store each K block transposed, AMX
packs tiles). Rather than copying that C++ layout here, :func:`block_layout` measures it once per
(isa, block size, head size, dtype): it writes a scratch block whose entries encode their own
logical (token, channel) position in base-16 digits (exact in every float type) through the very
same op, and reads back where each entry landed. :func:`gather` then turns the blocks of a batch of
requests into logical ``(R, Hkv, S, D)`` tensors with one index operation.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

BASE = 16
TRANSPOSED = "transposed"  # the block is stored as (head_size, block_size): read back as a strided view


@functools.lru_cache(maxsize=None)
def block_layout(isa: str, block_size: int, head_size: int, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(k_layout, v_layout)`` of one block of one KV head: ``None`` (stored as ``(block, head)``),
    :data:`TRANSPOSED` (stored as ``(head, block)``) or, for any other layout, an index giving for
    logical flat position ``t * head_size + c`` the flat position where the CPU kernel stores it."""
    from vllm import _custom_ops as ops

    n = block_size * head_size
    digits = 1
    while BASE ** digits < n:
        digits += 1
    where_k = torch.zeros(n, dtype=torch.long)
    where_v = torch.zeros(n, dtype=torch.long)
    logical = torch.arange(n)
    for i in range(digits):
        code = (logical // BASE ** i) % BASE + 1  # 1..16: exact in fp16/bf16/fp32
        kv = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
        kc, vc = kv.chunk(2, dim=2)
        src = code.view(block_size, 1, head_size).to(dtype)
        ops.cpu_attn_reshape_and_cache(src, src.clone(), kc, vc, torch.arange(block_size), isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        where_k += (kc.reshape(n).float().round().long() - 1) * BASE ** i
        where_v += (vc.reshape(n).float().round().long() - 1) * BASE ** i
    out: list[Any] = []
    transposed = torch.arange(n).view(block_size, head_size).t().reshape(n)  # block stored as (D, bs)
    for where in (where_k, where_v):
        # where[p] = logical index stored at physical p  ->  index[l] = physical position of logical l
        if sorted(where.tolist()) != list(range(n)):
            raise RuntimeError(f"could not measure the CPU KV-cache layout for isa={isa} block={block_size} "
                               f"head={head_size} {dtype}: the steered path cannot read this cache")
        if torch.equal(where, torch.arange(n)):
            out.append(None)
        elif torch.equal(where, transposed):
            out.append(TRANSPOSED)
        else:
            index = torch.empty(n, dtype=torch.long)
            index[where] = torch.arange(n)
            out.append(index)
    return out[0], out[1]


def gather(cache: torch.Tensor, index: Any, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Logical ``(R, Hkv, length, D)`` keys or values of ``R`` requests.

    ``cache``: one half of the layer's cache, ``(num_blocks, Hkv, block_size, D)`` (a view);
    ``block_table``: ``(R, n_blocks)`` block ids covering ``length`` tokens (pad with any valid id)."""
    nb, hkv, bs, d = cache.shape
    blocks = cache[block_table]  # (R, n, Hkv, bs, D) copy of just these blocks
    r, n = block_table.shape
    if isinstance(index, str):  # TRANSPOSED: each block holds (D, bs)
        blocks = blocks.reshape(r, n, hkv, d, bs).transpose(-1, -2)
    elif index is not None:
        blocks = blocks.reshape(r, n, hkv, bs * d)[..., index]
    blocks = blocks.reshape(r, n, hkv, bs, d).permute(0, 2, 1, 3, 4).reshape(r, hkv, n * bs, d)
    return blocks[:, :, :length]
