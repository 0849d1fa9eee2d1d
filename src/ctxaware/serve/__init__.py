"""An OpenAI-compatible HTTP server for a (steered) model: ``ctxaware serve``.

* :func:`build_app` — the FastAPI app over a :class:`ServeEngine` (continuous batching, per-row
  steering and sampling); :func:`serve_forever` runs it with uvicorn until SIGTERM;
  :class:`BackgroundServer` runs it in a thread (tests, benchmarks);
* :mod:`ctxaware.serve.protocol` — request validation, the ``ctxaware`` request extension
  (``{"alpha", "heads", "emphasis", "indicator"}``), OpenAI-style responses and errors.

FastAPI and uvicorn are imported only here (``pip install 'ctxaware[serve]'``). See ``docs/serve.md``.
"""

from __future__ import annotations

from .config import ServeConfig
from .engine import Generation, ServeEngine
from .protocol import APIError, ChatRequest, parse_request
from .server import BackgroundServer, build_app, serve_forever

__all__ = ["APIError", "BackgroundServer", "ChatRequest", "Generation", "ServeConfig", "ServeEngine", "build_app",
           "parse_request", "serve_forever"]
