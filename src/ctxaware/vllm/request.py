"""The request extension of the ctxaware vLLM plugin: body field, ``SamplingParams.extra_args`` keys, salt.

Clients steer a request with the same ``ctxaware`` body field as ``ctxaware serve``::

    "ctxaware": {"alpha": 0.9, "heads": "all", "emphasis": "user", "indicator": false}

(validated by :func:`ctxaware.serve.protocol.parse_steering`; fields left out come from the default
steering file, ``alpha: 1`` means unsteered). The front end (the API-server middleware,
:mod:`.server`, or an offline caller such as ``--engine vllm``) renders the conversation with
ctxaware's own role-span code (:func:`ctxaware.chat.render`) and turns config + rendered prompt into
flat ``SamplingParams.extra_args`` (flat values only, so they also travel through the OpenAI
server's ``vllm_xargs``) plus a ``cache_salt``:

==========================  =====================================================================
key                         value
==========================  =====================================================================
``ctxaware_alpha``          float in (0, 1): weight kept on down-weighted prompt keys
``ctxaware_heads``          str, JSON of the heads spec (``"all"``, ``"0-11"``, ``{"3": [0, 5]}``)
``ctxaware_compounding``    str, ``"none"`` or ``"reference"`` (as :class:`SteeringConfig`)
``ctxaware_spans``          list of int, flat ``[start0, end0, start1, end1, ...]``: the emphasised
                            (full-weight) prompt token ranges ``[start, end)``
``ctxaware_prompt_len``     int: prompt length; keys ``< prompt_len`` outside the spans get
                            ``log(alpha)``, generated keys never do
``ctxaware_prompt_sha``     str: digest of the prompt token ids (the worker checks the spans were
                            computed on the very prompt it runs)
``ctxaware_key``            str: digest of everything above (steering identity; part of the salt)
==========================  =====================================================================

A request without ``ctxaware_alpha`` is unsteered and runs vLLM's own kernel untouched.

**Prefix cache.** A steered prefill writes different K/V from the first steered layer on, and the
K/V of a position depends on which earlier keys were down-weighted (including generated keys,
which are never down-weighted while the same tokens in a later prompt are). So a steered request's
``cache_salt`` is the digest of its steering, spans and prompt (:func:`cache_salt`): a plain request
never reuses a steered one's blocks, and two requests with the same steering on the same prompt do.
A salt given by the client is kept and combined with ours.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError, SteeringError
from ..steering.config import SteeringConfig

ALPHA = "ctxaware_alpha"
HEADS = "ctxaware_heads"
COMPOUNDING = "ctxaware_compounding"
SPANS = "ctxaware_spans"
PROMPT_LEN = "ctxaware_prompt_len"
PROMPT_SHA = "ctxaware_prompt_sha"
KEY = "ctxaware_key"
EXTRA_KEYS = (ALPHA, HEADS, COMPOUNDING, SPANS, PROMPT_LEN, PROMPT_SHA, KEY)
BODY_FIELD = "ctxaware"
SALT_PREFIX = "ctxaware-"


class UnsteerableError(SteeringError):
    """This request's steering cannot be applied by the vLLM plugin (answered as a 400)."""


def prompt_digest(token_ids: Sequence[int]) -> str:
    """Short digest of a prompt's token ids (``ctxaware_prompt_sha``)."""
    return hashlib.sha256(json.dumps([int(t) for t in token_ids]).encode()).hexdigest()[:16]


def mask_spans(mask: Sequence[bool]) -> list[int]:
    """Bool mask -> flat ``[start, end, ...]`` of its True runs."""
    out: list[int] = []
    start = None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out += [start, i]
            start = None
    return out


def check_supported(config: SteeringConfig) -> None:
    """Refuse what the plugin cannot apply exactly (raises :class:`UnsteerableError`)."""
    if config.rule != "alpha":
        raise UnsteerableError(f"steering rule {config.rule!r} is not supported by the ctxaware vLLM plugin; "
                               "use rule 'alpha' (a fixed weight on the other prompt keys)")


@dataclass
class SteeringRequest:
    """What a front end adds to one vLLM request: ``extra_args`` for SamplingParams and ``cache_salt``
    for the prompt (``None`` when unsteered and the client gave none), and what the response reports."""

    extra_args: dict[str, Any] = field(default_factory=dict)
    cache_salt: str | None = None
    applied: dict[str, Any] = field(default_factory=dict)

    @property
    def steered(self) -> bool:
        return ALPHA in self.extra_args


def steering_key(config: SteeringConfig, spans: Sequence[int], prompt_len: int, prompt_sha: str) -> str:
    """Digest of the steering as applied to one prompt (``ctxaware_key``)."""
    raw = json.dumps({"alpha": config.alpha, "heads": config.heads, "compounding": config.compounding,
                      "spans": list(spans), "prompt_len": prompt_len, "prompt_sha": prompt_sha}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_salt(key: str | None, user_salt: str | None = None) -> str | None:
    """The prefix-cache salt: the client's own salt (if any) combined with the steering key (if any)."""
    if key is None:
        return user_salt
    return SALT_PREFIX + key + ("" if user_salt is None else "|" + user_salt)


def steering_request(config: SteeringConfig | None, rendered: Any, *, source: str = "request",
                     indicator: bool = False, user_salt: str | None = None) -> SteeringRequest:
    """``extra_args`` + ``cache_salt`` for a prompt (a :class:`~ctxaware.chat.types.RenderedChat`)
    steered by ``config`` (``None`` or ``alpha == 1``: unsteered, nothing added).

    Raises :class:`UnsteerableError` / :class:`SteeringError` when the steering cannot be applied
    (unsupported rule, no emphasised token)."""
    from ..steering.context import emphasis_mask

    if config is None or not config.active:
        return SteeringRequest({}, user_salt, {"steered": False, "source": source if config else "none",
                                               "indicator": indicator, "steering": None})
    check_supported(config)
    mask = emphasis_mask(rendered, config.emphasis_roles)[0].tolist()
    ids = list(rendered.input_ids)
    spans = mask_spans(mask)
    sha = prompt_digest(ids)
    key = steering_key(config, spans, len(ids), sha)
    extra = {ALPHA: float(config.alpha), HEADS: json.dumps(config.heads), COMPOUNDING: config.compounding,
             SPANS: spans, PROMPT_LEN: len(ids), PROMPT_SHA: sha, KEY: key}
    applied = {"steered": True, "source": source, "indicator": indicator, "steering": config.to_dict(),
               "emphasised_tokens": sum(mask), "prompt_tokens": len(ids)}
    return SteeringRequest(extra, cache_salt(key, user_salt), applied)


@dataclass(frozen=True)
class WorkerSteering:
    """The steering of one request as the attention backend reads it from ``extra_args``."""

    alpha: float
    heads: Any
    compounding: str
    spans: tuple[int, ...]
    prompt_len: int
    prompt_sha: str
    key: str

    def config(self) -> SteeringConfig:
        return SteeringConfig(alpha=self.alpha, heads=self.heads, compounding=self.compounding)


def read_extra_args(extra_args: dict[str, Any] | None) -> WorkerSteering | None:
    """Parse (and validate) the ``ctxaware_*`` keys of ``extra_args``; ``None`` when unsteered.

    Raises :class:`ConfigError` naming the bad key (a front end bug or a hand-written ``vllm_xargs``)."""
    args = extra_args or {}
    if ALPHA not in args:
        stray = sorted(k for k in args if k in EXTRA_KEYS)
        if stray:
            raise ConfigError(f"extra_args has {stray[0]} but no {ALPHA}: build them with "
                              "ctxaware.vllm.request.steering_request")
        return None
    missing = [k for k in EXTRA_KEYS if k not in args]
    if missing:
        raise ConfigError(f"extra_args lacks {missing[0]}: build them with ctxaware.vllm.request.steering_request")
    try:
        heads = json.loads(args[HEADS]) if isinstance(args[HEADS], str) else args[HEADS]
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{HEADS} must be JSON (e.g. '\"all\"'), got {args[HEADS]!r}") from exc
    config = SteeringConfig(alpha=args[ALPHA], heads=heads, compounding=str(args[COMPOUNDING]))
    spans = args[SPANS]
    prompt_len = args[PROMPT_LEN]
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
        raise ConfigError(f"{PROMPT_LEN} must be a positive integer, got {prompt_len!r}")
    if (not isinstance(spans, (list, tuple)) or len(spans) % 2 or not spans
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in spans)):
        raise ConfigError(f"{SPANS} must be a non-empty flat list of [start, end) int pairs, got {spans!r}")
    pairs = list(zip(spans[0::2], spans[1::2]))
    if any(not 0 <= a < b <= prompt_len for a, b in pairs):
        raise ConfigError(f"{SPANS} {spans!r} must lie in [0, {PROMPT_LEN}={prompt_len}) with start < end")
    return WorkerSteering(alpha=config.alpha, heads=config.heads, compounding=config.compounding,
                          spans=tuple(int(s) for s in spans), prompt_len=int(prompt_len),
                          prompt_sha=str(args[PROMPT_SHA]), key=str(args[KEY]))
