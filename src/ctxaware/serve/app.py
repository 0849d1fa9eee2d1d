"""The FastAPI application: OpenAI-compatible routes over a :class:`~ctxaware.serve.engine.ServeEngine`.

* ``POST /v1/chat/completions`` — validated by :mod:`ctxaware.serve.protocol`, rendered with the
  model's chat template (role spans from rendering, as everywhere in ctxaware), checked against
  the context window, then decoded by the engine's running batch; ``stream: true`` answers with
  server-sent events in the OpenAI chunk format, ended by ``data: [DONE]``.
* ``GET /v1/models`` and ``GET /health``.

Every error, 404s included, is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from ..errors import CtxawareError, require

require("fastapi", "serve")
from fastapi import FastAPI, Request  # noqa: E402  (route signatures are resolved from module globals)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from ..steering.config import SteeringConfig
from ..steering.model import SteeredModel
from .config import ServeConfig
from .engine import Generation, ServeEngine
from .protocol import APIError, ChatRequest, chunk_body, completion_body, new_id, parse_request, usage

logger = logging.getLogger(__name__)


def context_window(model: Any) -> int | None:
    """The model's maximum number of positions (prompt + reply), None when its config has none."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def _error_response(error: APIError) -> Any:
    return JSONResponse(error.body(), status_code=error.status)


class _Stream:
    """Events of one request, moved from the scheduler thread onto the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def sink(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


def create_app(engine: ServeEngine, model_name: str, config: ServeConfig | None = None,
               default_steering: SteeringConfig | None = None) -> Any:
    """The ASGI app serving ``engine`` under the id ``model_name``; the engine starts with the app."""
    config = config or ServeConfig()
    chat = SteeredModel(engine.model, engine.tokenizer)
    window = context_window(engine.model)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="ctxaware", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(f"{request.method} {request.url.path}: {exc.detail}",
                                        status=exc.status_code, type=kind, code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Any:  # pragma: no cover - a bug
        logger.exception("unhandled error")
        return _error_response(APIError(f"internal server error: {exc}", status=500, type="server_error"))

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "model": model_name, "running": engine.running, "queued": engine.queued,
                "max_concurrency": engine.max_concurrency}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "ctxaware"}]}

    def prepare(body: Any) -> tuple[ChatRequest, Any]:
        req = parse_request(body, default_steering)
        if req.steering is not None:
            try:
                req.steering.resolve_heads(*engine.dims)
            except CtxawareError as exc:
                raise APIError(f"ctxaware.heads: {exc}", param="ctxaware.heads", code="invalid_value") from None
        try:
            with engine.tokenizer_lock:
                rendered = chat.render(req.messages)
        except CtxawareError as exc:
            raise APIError(f"messages: {exc}", param="messages", code="invalid_value") from None
        n = len(rendered.input_ids)
        if window is not None and n >= window:
            raise APIError(f"the prompt has {n} tokens; this model's context window is {window} tokens "
                           "(prompt and reply together): shorten the messages", param="messages",
                           code="context_length_exceeded")
        room = window - n if window is not None else None
        if req.max_tokens is None:
            req.max_tokens = min(config.default_max_tokens, room) if room is not None else config.default_max_tokens
        elif room is not None and req.max_tokens > room:
            raise APIError(f"max_tokens={req.max_tokens} does not fit: the prompt has {n} tokens and the context "
                           f"window is {window}; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return req, rendered

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error_response(APIError(f"the request body is not valid JSON: {exc}", code="invalid_json"))
        try:
            from starlette.concurrency import run_in_threadpool

            req, rendered = await run_in_threadpool(prepare, body)
        except APIError as exc:
            return _error_response(exc)
        stream = _Stream()
        gen = Generation(input_ids=list(rendered.input_ids), rendered=rendered, max_tokens=req.max_tokens,
                         sink=stream.sink, steering=req.steering, temperature=req.temperature, top_p=req.top_p,
                         seed=req.seed, stop=req.stop, deadline=time.monotonic() + config.timeout)
        try:
            engine.submit(gen)
        except APIError as exc:
            return _error_response(exc)
        except CtxawareError as exc:  # e.g. nothing to emphasise in these messages
            return _error_response(APIError(f"ctxaware: {exc}", param="ctxaware", code="invalid_value"))
        rid, applied, prompt_tokens = new_id(), req.applied(), len(gen.input_ids)
        if req.stream:
            return StreamingResponse(_sse(stream, gen, rid, model_name, applied, req.include_usage, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts: list[str] = []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(stream.queue.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    return _error_response(value)
                else:
                    return completion_body(rid, model_name, "".join(parts), value, prompt_tokens,
                                           gen.completion_tokens, applied)
        finally:
            gen.cancel()

    return app


async def _sse(stream: _Stream, gen: Generation, rid: str, model: str, applied: dict, include_usage: bool,
               prompt_tokens: int) -> AsyncIterator[str]:
    def event(obj: Any) -> str:
        return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

    try:
        yield event(chunk_body(rid, model, {"role": "assistant", "content": ""}, applied=applied))
        while True:
            kind, value = await stream.queue.get()
            if kind == "text":
                yield event(chunk_body(rid, model, {"content": value}))
            elif kind == "error":
                yield event(value.body())
                break
            else:
                yield event(chunk_body(rid, model, {}, value, applied=applied))
                if include_usage:
                    yield event(chunk_body(rid, model, None, usage_=usage(prompt_tokens, gen.completion_tokens)))
                break
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()
