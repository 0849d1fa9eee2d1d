"""The MT-Bench judge: any OpenAI-compatible chat endpoint, called with retries, and its rating parsed.

:class:`JudgeClient` posts ``{model, messages, temperature: 0, max_tokens}`` to
``BASE_URL/chat/completions`` (httpx, imported only here: ``pip install 'ctxaware[mtbench]'``).
A try fails on a transport error or timeout, on HTTP 408/409/429/5xx, and on a reply without a
rating; it is retried up to ``retries`` times with exponential backoff (``backoff · 2^k`` seconds,
at most 60, or the server's ``Retry-After`` for a 429). After the last try the verdict has
``score=None`` (unjudged), never 0. HTTP 401/403/404 stop the run (:class:`JudgeError`): every
other call would fail the same way. Other 4xx answers (e.g. a prompt longer than the judge's
window) are not retried.

The rating is FastChat's: the first ``[[x]]`` in the reply, else the first ``[x]``; a value outside
1..10 counts as no rating.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import CtxawareError, require

logger = logging.getLogger(__name__)

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})
MAX_BACKOFF = 60.0


class JudgeError(CtxawareError, RuntimeError):
    """The judge cannot be used at all (unreachable, refused key, unknown model)."""


def parse_rating(reply: str | None) -> float | None:
    """The judge's rating in ``reply`` (``[[x]]``, else ``[x]``, as FastChat), None when there is none
    or it is outside 1..10."""
    if not isinstance(reply, str):
        return None
    match = _RATING.search(reply) or _RATING_BACKUP.search(reply)
    if not match:
        return None
    value = float(match.group(1))
    return value if 1.0 <= value <= 10.0 and math.isfinite(value) else None


@dataclass
class Verdict:
    """One judged turn: the rating (None = unjudged), the raw reply and how it went."""

    score: float | None
    reply: str | None
    tries: int
    error: str | None = None


class JudgeClient:
    """A thread-safe client of one OpenAI-compatible judge (one connection pool for all threads)."""

    def __init__(self, base_url: str, model: str | None, *, api_key: str | None = None, retries: int = 3,
                 timeout: float = 120.0, backoff: float = 1.0, max_tokens: int | None = 2048,
                 concurrency: int = 8) -> None:
        httpx = require("httpx", "mtbench")
        self.base_url = base_url.rstrip("/")
        self.model, self.retries, self.backoff, self.max_tokens = model, int(retries), float(backoff), max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._httpx = httpx
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout),
                                    limits=httpx.Limits(max_connections=max(1, concurrency)))
        self._lock = threading.Lock()
        self.requests = 0
        self.check_timeout = min(10.0, float(timeout))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def check(self) -> str:
        """Fail fast, before any generation, when the judge is unreachable or refuses the key; returns
        the judge model (the endpoint's only model when none was named)."""
        url = self.base_url + "/models"
        try:
            resp = self._client.get(url, timeout=self.check_timeout)
        except (self._httpx.ConnectError, self._httpx.ConnectTimeout, self._httpx.UnsupportedProtocol,
                self._httpx.InvalidURL) as exc:
            raise JudgeError(f"the judge at {self.base_url} is unreachable ({type(exc).__name__}: {exc}); start "
                             "it or fix --judge-base-url (e.g. http://127.0.0.1:8000/v1)") from None
        except self._httpx.HTTPError as exc:  # it accepted the connection: a slow or odd /models is not fatal
            if not self.model:
                raise JudgeError(f"no --judge-model given and {url} did not answer ({type(exc).__name__}); pass "
                                 "--judge-model NAME") from None
            logger.warning("the judge's %s did not answer (%s); going on", url, type(exc).__name__)
            return self.model
        if resp.status_code in (401, 403):
            raise JudgeError(f"the judge at {self.base_url} refused the API key (HTTP {resp.status_code}); set "
                             "OPENAI_API_KEY or name the variable with --judge-api-key-env")
        if self.model:
            return self.model
        try:
            ids = [m["id"] for m in resp.json()["data"]] if resp.status_code == 200 else []
        except (ValueError, KeyError, TypeError):
            ids = []
        if len(ids) != 1:
            raise JudgeError(f"no --judge-model given and {url} does not list exactly one model "
                             f"({', '.join(map(str, ids)) or 'none'}); pass --judge-model NAME")
        self.model = str(ids[0])
        return self.model

    def _wait(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(MAX_BACKOFF, self.backoff * (2 ** attempt))
        if retry_after:
            try:
                delay = min(MAX_BACKOFF, max(delay, float(retry_after)))
            except ValueError:
                pass
        time.sleep(delay)

    def judge(self, messages: list[dict[str, str]]) -> Verdict:
        """Rate one turn: post ``messages`` until a rating comes back or the tries run out."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if self.max_tokens:
            body["max_tokens"] = int(self.max_tokens)
        reply, error = None, None
        tries = 0
        for attempt in range(self.retries + 1):
            tries += 1
            retry_after = None
            with self._lock:
                self.requests += 1
            try:
                resp = self._client.post(self.base_url + "/chat/completions", json=body)
            except self._httpx.HTTPError as exc:  # timeouts, refused connections, broken streams
                error = f"{type(exc).__name__}: {exc}".strip()
            else:
                if resp.status_code in FATAL_STATUS:
                    raise JudgeError(f"the judge answered HTTP {resp.status_code} ({resp.text[:200].strip()}); check "
                                     "--judge-base-url, --judge-model and the API key")
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}: {resp.text[:200].strip()}"
                    retry_after = resp.headers.get("retry-after")
                    if resp.status_code not in RETRY_STATUS:
                        return Verdict(None, None, tries, error)
                else:
                    try:
                        reply = resp.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        reply, error = None, f"malformed reply: {resp.text[:200].strip()}"
                    else:
                        score = parse_rating(reply)
                        if score is not None:
                            return Verdict(score, reply, tries)
                        error = "no [[rating]] in the reply"
            if attempt < self.retries:
                logger.debug("judge try %d failed (%s); retrying", tries, error)
                self._wait(attempt, retry_after)
        return Verdict(None, reply, tries, error)
