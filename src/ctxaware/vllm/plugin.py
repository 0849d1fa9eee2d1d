"""The ``vllm.general_plugins`` entry point: checks the vLLM version and overrides its attention backend.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) when
ctxaware is installed (``pip install "ctxaware[vllm]"``; ``VLLM_PLUGINS`` without ``ctxaware``
turns it off). It registers ctxaware's subclass of the backend the platform uses through vLLM's
public registry — ``register_backend(AttentionBackendEnum.CPU_ATTN, ...)`` on CPU — and nothing
else: unsteered requests run vLLM's own kernel. Outside :data:`SUPPORTED` (the vLLM versions this
plugin was tested on) or on a platform without a steered backend, it logs one line and leaves vLLM
untouched; steered requests are then refused with a 400 (:mod:`.batch`), never run unsteered.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED = ((0, 32), (0, 33))  # vLLM versions [0.32, 0.33)
SUPPORTED_TEXT = ">=0.32,<0.33"
_STATE: dict[str, str | None] = {"reason": "the ctxaware vLLM plugin was not loaded (is VLLM_PLUGINS set "
                                           "without ctxaware?)"}


def _version_tuple(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def version_supported(text: str) -> bool:
    return SUPPORTED[0] <= _version_tuple(text) < SUPPORTED[1]


def inactive_reason() -> str | None:
    """Why steering cannot run in this process (``None`` when the override is active)."""
    return _STATE["reason"]


def register() -> None:
    """Entry point: override the platform's attention backend with ctxaware's steered subclass."""
    import vllm
    from vllm.platforms import current_platform

    if not version_supported(vllm.__version__):
        _STATE["reason"] = (f"ctxaware's vLLM plugin supports vLLM {SUPPORTED_TEXT}, not {vllm.__version__} "
                            "(pip install \"ctxaware[vllm]\" pins a supported one)")
        logger.warning("ctxaware: %s; steering is off", _STATE["reason"])
        return
    if not current_platform.is_cpu():
        _STATE["reason"] = (f"ctxaware's vLLM plugin steers on vLLM's CPU backend only in this version, not on "
                            f"{current_platform.device_name or current_platform.device_type}")
        logger.warning("ctxaware: %s; steering is off", _STATE["reason"])
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "ctxaware.vllm.cpu_backend.SteeredCPUAttentionBackend")
    _STATE["reason"] = None
    logger.info("ctxaware: steered attention registered over CPU_ATTN")


def unsteerable_model_reason(model_config: Any) -> str | None:
    """Why this model's attention cannot be steered by the plugin (``None`` when it can).

    The steered rows are recomputed for standard decoder self-attention through ``CPU_ATTN``;
    models whose layers use another backend (MLA, Mamba/linear-attention hybrids), ALiBi or
    attention sinks are refused up front (front ends answer 400) instead of running unsteered."""
    text = model_config.hf_text_config
    model_type = str(getattr(text, "model_type", "")).lower()
    if getattr(model_config, "use_mla", False):
        return f"{model_type} uses multi-head latent attention (MLA), which the plugin does not steer"
    if getattr(model_config, "is_hybrid", False) or getattr(text, "layers_block_type", None):
        return f"{model_type} mixes attention with state-space/linear layers, which the plugin does not steer"
    if (getattr(text, "alibi", False) or getattr(text, "position_embedding_type", None) == "alibi"
            or model_type in ("bloom", "mpt", "baichuan")):
        return f"{model_type} uses ALiBi position biases, which the steered path does not implement"
    if model_type in ("gpt_oss",) or getattr(text, "sinks", None) is not None:
        return f"{model_type} uses attention sinks, which the steered path does not implement"
    return None
