"""ctxaware: measure and repair the loss of context awareness in instruction-tuned chat LLMs.

The public API is imported lazily so that ``import ctxaware`` stays fast: torch and
transformers load only when a function that needs them is first used.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "load_model": "ctxaware.models",
    "load_tokenizer": "ctxaware.models",
    "render": "ctxaware.chat",
    "render_batch": "ctxaware.chat",
    "RenderedChat": "ctxaware.chat",
    "RoleSpan": "ctxaware.chat",
    "Message": "ctxaware.chat",
    "SteeringConfig": "ctxaware.steering",
    "steer": "ctxaware.steering",
    "SteeredModel": "ctxaware.steering",
    "measure_attention": "ctxaware.measure",
    "CtxawareError": "ctxaware.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
