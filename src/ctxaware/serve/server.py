"""Running the app with uvicorn: in the foreground (``ctxaware serve``) or in a background thread.

:func:`serve_forever` blocks until SIGINT/SIGTERM; uvicorn then stops accepting connections and lets
in-flight requests finish (for up to the request timeout) before the engine stops and cancels
whatever is left. :class:`BackgroundServer` runs the same server in a thread on a free loopback
port, for tests, benchmarks and notebooks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from ..errors import require
from ..steering.config import SteeringConfig
from .app import create_app
from .config import ServeConfig
from .engine import ServeEngine

logger = logging.getLogger(__name__)


def build_app(model: Any, tokenizer: Any, model_name: str, config: ServeConfig | None = None,
              steering: SteeringConfig | None = None) -> Any:
    """The ASGI app for ``model``: a :class:`ServeEngine` with the config's limits behind the routes."""
    require("fastapi", "serve")
    config = config or ServeConfig()
    if steering is not None:
        from ..attention.backend import model_dims

        steering.resolve_heads(*model_dims(model))
        if not steering.active:
            steering = None
    engine = ServeEngine(model, tokenizer, max_concurrency=config.max_concurrency, max_queue=config.max_queue,
                         prefill_tokens=config.prefill_tokens)
    return create_app(engine, model_name, config, steering)


def _uvicorn_server(app: Any, config: ServeConfig, log_level: str = "warning") -> Any:
    uvicorn = require("uvicorn", "serve")
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                         timeout_graceful_shutdown=int(config.timeout) + 1, lifespan="on"))


def serve_forever(app: Any, config: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM (graceful: in-flight requests finish first)."""
    import signal

    server = _uvicorn_server(app, config, log_level="info")  # uvicorn prints the address and each request
    # uvicorn re-raises a captured SIGTERM once it has shut down; a handler that does nothing turns that
    # into a normal exit (status 0) after the graceful shutdown
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """``with BackgroundServer(app) as srv: OpenAI(base_url=srv.base_url, api_key="x")`` — uvicorn in a
    thread on a free port of 127.0.0.1 (or ``config.host``/``config.port``)."""

    def __init__(self, app: Any, config: ServeConfig | None = None, start_timeout: float = 60.0) -> None:
        self.config = config or ServeConfig(port=0)
        self.app, self.start_timeout = app, start_timeout
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/v1"

    def __enter__(self) -> "BackgroundServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        self.port = sock.getsockname()[1]
        self.server = _uvicorn_server(self.app, self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="ctxaware-uvicorn")
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > self.start_timeout:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)
