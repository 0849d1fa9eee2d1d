"""``vllm serve`` + ctxaware: an ASGI middleware that turns the ``ctxaware`` body field into vLLM arguments.

Users start vLLM's own OpenAI server with vLLM's public ``--middleware`` option::

    python -m vllm.entrypoints.openai.api_server --model DIR \\
        --middleware ctxaware.vllm.server.CtxawareMiddleware

(``CTXAWARE_VLLM_STEERING=steer.yaml`` sets the default steering file for requests that say nothing.)
For ``POST /v1/chat/completions`` the middleware

1. validates ``"ctxaware": {"alpha", "heads", "emphasis", "indicator"}`` exactly as ``ctxaware serve``
   does (:func:`ctxaware.serve.protocol.parse_steering`) and removes it from the body;
2. renders the request's messages with the model's chat template through ctxaware's role-span code
   (:func:`ctxaware.chat.render`; the same template, ``add_generation_prompt``,
   ``continue_final_message`` and ``chat_template_kwargs`` vLLM uses), checks that vLLM's
   tokenisation of that text gives the same ids, and adds the steering as ``vllm_xargs`` and the
   per-steering ``cache_salt`` (:func:`ctxaware.vllm.request.steering_request`);
3. adds ``"ctxaware": {...applied...}`` to the response (JSON body, or the first and the last
   event of a stream) and the header ``x-ctxaware-steering``.

Anything it cannot steer exactly — bad fields, heads outside the model, no user turn, the plugin
inactive in this vLLM, content it cannot align — is answered 400 in the OpenAI error format,
never sent on unsteered. Requests without steering (and every other route) pass through untouched.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ..errors import CtxawareError
from ..serve.protocol import APIError, append_indicator, invalid, parse_messages, parse_steering
from . import request as RQ

logger = logging.getLogger(__name__)
STEERING_ENV = "CTXAWARE_VLLM_STEERING"
ROUTE = "/v1/chat/completions"
HEADER = b"x-ctxaware-steering"


class Steerer:
    """What the middleware needs of the served model: tokenizer, layer/head counts, default steering."""

    def __init__(self, vllm_config: Any, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        mc = vllm_config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code,
                                                       revision=mc.tokenizer_revision)
        text = mc.hf_text_config
        self.layers, self.heads = int(text.num_hidden_layers), int(text.num_attention_heads)
        self.chat_template = chat_template
        from .plugin import unsteerable_model_reason

        self.unsteerable = unsteerable_model_reason(mc)
        path = os.environ.get(STEERING_ENV)
        self.default = None
        if path:
            from ..steering.file import load_steering_file

            self.default = load_steering_file(path)
            logger.info("ctxaware: default steering from %s: %s", path, self.default.to_dict())

    def prepare(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(new body, applied) for one chat request; raises :class:`APIError` (400)."""
        from ..chat import render
        from .plugin import inactive_reason

        body = dict(body)
        config, source, indicator = parse_steering(body.pop(RQ.BODY_FIELD, None), self.default)
        if config is None:
            if indicator:
                body["messages"] = append_indicator(parse_messages(body.get("messages")))
            return body, RQ.steering_request(None, None, indicator=indicator).applied
        reason = inactive_reason() or self.unsteerable
        if reason:
            raise APIError(f"this request is steered but {reason}", param=RQ.BODY_FIELD, code="unsteerable")
        try:
            config.resolve_heads(self.layers, self.heads)
        except CtxawareError as exc:
            raise invalid(f"ctxaware.heads: {exc}", "ctxaware.heads") from None
        for part_list in (m.get("content") for m in body.get("messages") or [] if isinstance(m, dict)):
            if isinstance(part_list, list) and len(part_list) > 1:
                raise invalid("steered requests take each message's content as a string or one text part "
                              "(several parts may be joined differently by vLLM)", "messages", "unsupported_value")
        messages = parse_messages(body.get("messages"))
        if indicator:
            messages = append_indicator(messages)
        cont = bool(body.get("continue_final_message", False))
        gen = bool(body.get("add_generation_prompt", not cont))
        try:
            rendered = render(self.tokenizer, messages, add_generation_prompt=gen, continue_final_message=cont,
                              chat_template=body.get("chat_template") or self.chat_template,
                              template_kwargs=body.get("chat_template_kwargs") or {})
            sr = RQ.steering_request(config, rendered, source=source, indicator=indicator,
                                     user_salt=body.get("cache_salt"))
        except CtxawareError as exc:
            raise invalid(f"ctxaware: {exc}", RQ.BODY_FIELD) from None
        if self.tokenizer(rendered.text, add_special_tokens=False)["input_ids"] != list(rendered.input_ids):
            raise APIError("ctxaware: this tokenizer's offsets do not reproduce vLLM's prompt tokens; the "
                           "user-turn spans cannot be aligned", param="messages", code="unsteerable")
        body["messages"] = messages
        body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), **sr.extra_args}
        body["cache_salt"] = sr.cache_salt
        return body, sr.applied


def _header(scope: dict, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", []) if k.lower() == name), None)


class CtxawareMiddleware:
    """ASGI middleware for vLLM's OpenAI server (``--middleware ctxaware.vllm.server.CtxawareMiddleware``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._steerer: Steerer | None = None

    def steerer(self, scope: dict) -> Steerer:
        if self._steerer is None:
            state = scope["app"].state
            args = getattr(state, "args", None)
            template = getattr(args, "chat_template", None)
            if template and os.path.isfile(template):
                with open(template) as f:
                    template = f.read()
            self._steerer = Steerer(state.vllm_config, template)
        return self._steerer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") != ROUTE:
            await self.app(scope, receive, send)
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):  # vLLM answers malformed bodies itself
            await self.app(scope, _replay(raw, receive), send)
            return
        try:
            new, applied = self.steerer(scope).prepare(body)
        except APIError as exc:
            await _json(send, exc.status, exc.body())
            return
        data = json.dumps(new).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(data)).encode())]}
        await self.app(scope, _replay(data, receive), _Reply(send, applied))


def _replay(data: bytes, receive: Any) -> Any:
    """The (rewritten) body once, then the client's own channel (vLLM listens on it for disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return replay


async def _json(send: Any, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class _Reply:
    """Adds ``applied`` to the response: a JSON body, or the first and finishing events of a stream."""

    def __init__(self, send: Any, applied: dict) -> None:
        self.send, self.applied = send, applied
        self.mode = "pass"
        self.start: dict | None = None
        self.buffer = b""
        self.first = True

    async def __call__(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = dict((k.lower(), v) for k, v in message.get("headers", []))
            ctype = headers.get(b"content-type", b"")
            ok = message.get("status") == 200
            self.mode = "json" if ok and ctype.startswith(b"application/json") else \
                "sse" if ok and ctype.startswith(b"text/event-stream") else "pass"
            extra = [(HEADER, json.dumps(self.applied, separators=(",", ":")).encode())]
            message = {**message, "headers": list(message.get("headers", [])) + extra}
            if self.mode == "json":
                self.start = message  # sent with the final length
                return
            await self.send(message)
            return
        if kind != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if more:
                return
            try:
                payload = json.loads(self.buffer)
                payload["ctxaware"] = self.applied
                data = json.dumps(payload).encode()
            except (ValueError, TypeError):
                data = self.buffer
            headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
            await self.send({**self.start, "headers": headers + [(b"content-length", str(len(data)).encode())]})
            await self.send({"type": "http.response.body", "body": data})
            return
        *events, self.buffer = self.buffer.split(b"\n\n")
        out = b"".join(self._event(e) + b"\n\n" for e in events)
        if not more:
            out += self.buffer
            self.buffer = b""
        await self.send({"type": "http.response.body", "body": out, "more_body": more})

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event.strip() == b"data: [DONE]":
            return event
        try:
            payload = json.loads(event[6:])
        except ValueError:
            return event
        finishing = any(c.get("finish_reason") for c in payload.get("choices") or [])
        if self.first or finishing:
            payload["ctxaware"] = self.applied
            self.first = False
            return b"data: " + json.dumps(payload).encode()
        return event
