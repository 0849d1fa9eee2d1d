"""Which SDPA kernel PyTorch can use for given shapes: the documented eligibility rules, as a predicate.

:func:`kernel_for` restates the constraints of ``torch.nn.functional.scaled_dot_product_attention``'s
backends (``torch/backends/cuda`` docs and ``sdp_utils``) for the inputs the steering paths
produce, so tests can assert that the padded steering channels keep a fused kernel eligible, and
``benchmarks/steering_overhead.py`` can report the kernel each path used:

* CUDA ``flash``: fp16/bf16, no explicit mask (``is_causal`` is fine), equal q/k/v head dims
  ``<= 256`` and a multiple of 8;
* CUDA ``efficient`` (memory-efficient): fp16/bf16/fp32, any mask, head dims (q/k and v) a multiple
  of 8 in half types and of 4 in fp32; un-repeated grouped-query heads (``enable_gqa``) are not
  taken (the steering path repeats kv heads where it has to);
* CPU ``flash`` (the CPU flash-attention kernel): any float dtype and mask, equal q/k/v head dims,
  no dropout;
* otherwise ``math``, which materialises the ``B·H·Tq·Tk`` scores.
"""

from __future__ import annotations

from typing import Sequence

import torch

HALF = (torch.float16, torch.bfloat16)
KERNELS = ("flash", "efficient", "math")


def alignment(dtype: torch.dtype) -> int:
    """Head-dim multiple the memory-efficient CUDA kernel needs: 8 in fp16/bf16, 4 otherwise."""
    return 8 if dtype in HALF else 4


def kernel_for(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int], dtype: torch.dtype,
               device: torch.device | str, *, mask: str | None = None, dropout: float = 0.0,
               enable_gqa: bool = False) -> str:
    """``"flash"``, ``"efficient"`` or ``"math"``: the best SDPA kernel the inputs are eligible for.

    ``mask``: None (no explicit mask, possibly ``is_causal``), ``"bool"`` or ``"float"``.
    """
    dev = torch.device(device).type
    dq, dk, dv = int(q_shape[-1]), int(k_shape[-1]), int(v_shape[-1])
    if dev == "cpu":
        return "flash" if dq == dk == dv and dropout == 0.0 and dtype.is_floating_point else "math"
    if dev != "cuda":
        return "math"
    if dtype in HALF and mask is None and dq == dk == dv and dq <= 256 and dq % 8 == 0:
        return "flash"
    align = alignment(dtype)
    if dtype in (*HALF, torch.float32) and not enable_gqa and dq == dk and dq % align == 0 and dv % align == 0:
        return "efficient"
    return "math"


def materialises_scores(kernel: str) -> bool:
    """True for the kernels that hold the full ``T × T`` score matrix (only ``math``)."""
    return kernel == "math"
