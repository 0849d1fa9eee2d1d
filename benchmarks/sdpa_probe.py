"""Which SDPA kernel the attention calls of a block were eligible for, observed on the real calls.

:func:`recorded_kernels` wraps ``torch.nn.functional.scaled_dot_product_attention`` for the duration
of a ``with`` block (transformers' SDPA attention and ctxaware's steered attention both look it up
at call time) and counts, per call, the kernel ``ctxaware.attention.kernels.kernel_for`` says the
call's actual shapes, dtype, device, mask kind and GQA flag are eligible for (``flash``,
``efficient``, ``math``). The benchmarks print the counts beside their timings, so a steered path
that silently fell back to the score-materialising ``math`` kernel shows up in the table:

    with recorded_kernels() as kernels:
        model(input_ids=ids)
    print(kernel_summary(kernels))           # e.g. "flash ×30"

:func:`peak_memory` reads the peak CUDA memory since the last :func:`reset_peak_memory` (None on CPU).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ctxaware.attention.kernels import kernel_for


@contextlib.contextmanager
def recorded_kernels() -> Iterator[Counter]:
    """Count the eligible SDPA kernel of every ``scaled_dot_product_attention`` call inside the block."""
    counts: Counter = Counter()
    original = F.scaled_dot_product_attention

    def wrapper(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: Any = None, enable_gqa: bool = False, **kw: Any) -> Any:
        mask = None if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float")
        counts[kernel_for(query.shape, key.shape, value.shape, query.dtype, query.device, mask=mask,
                          dropout=dropout_p, enable_gqa=enable_gqa)] += 1
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, **kw)

    F.scaled_dot_product_attention = wrapper
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = original


def kernel_summary(counts: Counter) -> str:
    """``"flash ×30"`` / ``"efficient ×28, math ×2"`` / ``"no SDPA call"``."""
    if not counts:
        return "no SDPA call"
    return ", ".join(f"{name} ×{n}" for name, n in counts.most_common())


def reset_peak_memory(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: Any) -> float | None:
    """Peak CUDA memory in MiB since :func:`reset_peak_memory`; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20
