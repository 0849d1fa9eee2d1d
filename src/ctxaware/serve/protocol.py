"""The OpenAI chat-completions wire format: request validation, response and error bodies.

:func:`parse_request` turns a decoded JSON body into a :class:`ChatRequest` (plain messages,
sampling, stop strings, and the ``ctxaware`` steering extension resolved against the server's
default), raising :class:`APIError` — status, OpenAI ``type``, ``param`` and ``code`` — for
anything invalid, so the HTTP layer answers ``{"error": {...}}`` with status 400 as the OpenAI API
does. :func:`completion_body` and :func:`chunk_body` build the response objects.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import CtxawareError
from ..scoring.indicator import INDICATOR
from ..steering.config import SteeringConfig

STEERING_KEYS = ("alpha", "heads", "emphasis")
CTXAWARE_KEYS = (*STEERING_KEYS, "indicator")
# Accepted and ignored: they change nothing about the reply (bookkeeping of the OpenAI platform).
IGNORED = ("model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier")
KNOWN = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
         "stream", "stream_options", "ctxaware", "presence_penalty", "frequency_penalty", "logprobs",
         "top_logprobs", "logit_bias", "response_format", "tools", "tool_choice", *IGNORED)
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4


class APIError(CtxawareError):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(message, param=param, code=code)


@dataclass
class ChatRequest:
    """A validated chat-completion request (messages not yet rendered)."""

    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    steering: SteeringConfig | None = None
    steering_source: str = "none"  # "request", "server" or "none"
    indicator: bool = False

    def applied(self) -> dict[str, Any]:
        """What the ``ctxaware`` object of the response reports: the steering and indicator applied."""
        cfg = self.steering
        return {"steered": cfg is not None, "source": self.steering_source, "indicator": self.indicator,
                "steering": None if cfg is None else cfg.to_dict()}


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if not low <= value <= high:
        raise invalid(f"{name} must lie in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    if value < low:
        raise invalid(f"{name} must be at least {low}, got {value}", name)
    return value


def _content(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{param}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                              f"supported, got {kind!r}", f"{param}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{param} must be a string or a list of text parts, got {type(content).__name__}", param,
                  "invalid_type")


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI/HF messages -> ``[{role, content}]`` with string content (``developer`` -> ``system``)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of {role, content} objects", "messages",
                      "invalid_type" if not isinstance(messages, list) else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object with role and content", f"messages[{i}]", "invalid_type")
        role = ROLE_ALIASES.get(m.get("role"))
        if role is None:
            raise invalid(f"messages[{i}].role {m.get('role')!r} is not supported; use system, developer, user "
                          "or assistant", f"messages[{i}].role")
        if m.get("tool_calls"):
            raise invalid(f"messages[{i}]: tool calls are not supported", f"messages[{i}].tool_calls")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"stop must be a string or a list of strings, got {value!r}", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise invalid(f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    return [s for s in stops if s]


def parse_steering(value: Any, default: SteeringConfig | None) -> tuple[SteeringConfig | None, str, bool]:
    """The ``ctxaware`` body field -> (steering config or None, its source, indicator).

    Fields given override the server default (``default``; SteeringConfig's defaults when the
    server has none); ``alpha == 1`` means unsteered.
    """
    if value is None:
        return default, ("server" if default is not None else "none"), False
    if not isinstance(value, dict):
        raise invalid(f"ctxaware must be an object with keys {', '.join(CTXAWARE_KEYS)}, got {type(value).__name__}",
                      "ctxaware", "invalid_type")
    unknown = sorted(set(value) - set(CTXAWARE_KEYS))
    if unknown:
        raise invalid(f"unknown field ctxaware.{unknown[0]}; allowed: {', '.join(CTXAWARE_KEYS)}",
                      f"ctxaware.{unknown[0]}", "unknown_parameter")
    indicator = value.get("indicator", False)
    if not isinstance(indicator, bool):
        raise invalid(f"ctxaware.indicator must be true or false, got {indicator!r}", "ctxaware.indicator",
                      "invalid_type")
    given = {k: value[k] for k in STEERING_KEYS if k in value}
    if not given:
        return default, ("server" if default is not None else "none"), indicator
    for name, v in given.items():
        try:
            (default or SteeringConfig()).replace(**{name: v})
        except CtxawareError as exc:
            raise invalid(f"ctxaware.{name}: {exc}", f"ctxaware.{name}") from None
        except (TypeError, ValueError) as exc:
            raise invalid(f"ctxaware.{name}: invalid value {v!r} ({exc})", f"ctxaware.{name}") from None
    config = (default or SteeringConfig()).replace(**given)
    return (config if config.active else None), "request", indicator


def append_indicator(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``ctxaware.indicator``: the messages with ``[IND]`` appended to the last user turn (once)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise invalid("ctxaware.indicator needs a user message to append " + INDICATOR + " to", "ctxaware.indicator")
    out = list(messages)
    last = out[users[-1]]
    if not last["content"].rstrip().endswith(INDICATOR):
        out[users[-1]] = {**last, "content": last["content"] + " " + INDICATOR}
    return out


def parse_request(body: Any, default_steering: SteeringConfig | None = None) -> ChatRequest:
    """Validate a decoded request body; raises :class:`APIError` (status 400) naming the bad field."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    unknown = sorted(set(body) - set(KNOWN))
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise invalid(f"n must be 1 (one choice per request), got {n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise invalid(f"{name} is not supported; leave it unset or 0", name, "unsupported_value")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise invalid("logprobs are not supported; leave logprobs unset or false", "logprobs", "unsupported_value")
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise invalid("tools are not supported by this server", "tools", "unsupported_value")
    if body.get("logit_bias"):
        raise invalid("logit_bias is not supported; leave it unset", "logit_bias", "unsupported_value")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise invalid("only response_format {\"type\": \"text\"} is supported", "response_format", "unsupported_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid(f"stream must be true or false, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise invalid("stream_options takes only include_usage", "stream_options")
    max_completion = _integer(body, "max_completion_tokens", 1)
    max_tokens = max_completion if max_completion is not None else _integer(body, "max_tokens", 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid(f"seed must be an integer, got {seed!r}", "seed", "invalid_type")
    steering, source, indicator = parse_steering(body.get("ctxaware"), default_steering)
    messages = parse_messages(body.get("messages"))
    if indicator:
        messages = append_indicator(messages)
    return ChatRequest(messages=messages, max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0, 2),
                       top_p=_number(body, "top_p", 1.0, 0, 1), seed=seed, stop=_stops(body.get("stop")),
                       stream=stream, include_usage=bool(options.get("include_usage")), steering=steering,
                       steering_source=source, indicator=indicator)


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, applied: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "ctxaware": applied}


def chunk_body(rid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None, *,
               usage_: dict[str, int] | None = None, applied: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model, "system_fingerprint": None,
                           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                                 "finish_reason": finish_reason}]}
    if usage_ is not None:
        out["usage"] = usage_
    if applied is not None:
        out["ctxaware"] = applied
    return out
