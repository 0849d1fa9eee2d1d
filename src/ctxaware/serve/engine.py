"""Continuous batching for the server: one scheduler thread decodes every running request together.

:class:`ServeEngine` owns the model. HTTP handlers :meth:`~ServeEngine.submit` a :class:`Generation`
(a rendered prompt, its steering, sampling and limits) into a bounded queue; the scheduler thread
loops: admit waiting requests (the joining prompts prefilled together in left-padded forward passes
of at most ``prefill_tokens`` padded tokens, each row under its own steering), run one
decoding step for the running batch, hand every row its new text, and drop rows that ended,
were cancelled or timed out. So a request joins and leaves the running batch between decoding
steps. The batch's KV cache is the NIH engine's :class:`~ctxaware.niah.engine.BufferLayer` (a
preallocated, left-padded buffer with row selection), rebuilt — with the left padding no row needs
trimmed away — whenever requests join.

Steering per row: :func:`ctxaware.steering.steer_rows` gives every row of a forward pass its own
config (alpha, heads, emphasised roles) or none (exactly zero bias), so steered and unsteered
requests share one batch; each row's emphasis mask covers its own prompt, generated keys get no bias.

Sampling per row: greedy when ``temperature == 0``, else temperature + nucleus (``top_p``) sampling
from the row's own ``torch.Generator`` (seeded by the request's ``seed``), so a row's tokens do not
depend on which other requests share its batch.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..niah.engine import BufferLayer
from ..steering.config import SteeringConfig
from ..steering.context import emphasis_mask, steer_rows
from ..steering.model import greedy_generation_config
from .protocol import APIError

logger = logging.getLogger(__name__)
BATCH = "running"  # the one running batch (the engine keeps batches in a dict keyed by name)

@dataclass(eq=False)
class Generation:
    """One request to decode. ``sink(kind, value)`` receives ``("text", str)`` pieces, then
    ``("done", finish_reason)`` or ``("error", APIError)``, from the scheduler thread."""

    input_ids: list[int]
    rendered: Any
    max_tokens: int
    sink: Callable[[str, Any], None]
    steering: SteeringConfig | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    deadline: float = float("inf")
    # filled by the engine
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    finished: bool = False
    cancelled: bool = False
    emphasis: list[bool] | None = None
    generator: torch.Generator | None = None
    start: int = 0  # buffer index of the row's first real token

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class ServeEngine:
    """The model, its tokenizer and the scheduler thread (started by :meth:`start`)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_concurrency: int = 8, max_queue: int = 64,
                 prefill_tokens: int = 8192) -> None:
        if max_concurrency < 1 or max_queue < 0 or prefill_tokens < 1:
            raise ValueError(f"max_concurrency and prefill_tokens must be >= 1 and max_queue >= 0, got "
                             f"{max_concurrency}, {prefill_tokens}, {max_queue}")
        from ..attention.backend import model_dims

        self.model, self.tokenizer = model, tokenizer
        self.max_concurrency, self.max_queue, self.prefill_tokens = max_concurrency, max_queue, prefill_tokens
        self.dims = model_dims(model)
        gen = greedy_generation_config(model, tokenizer, 1)
        eos = gen.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else eos)
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.waiting: queue.Queue[Generation] = queue.Queue()
        self.groups: dict[Any, list[Generation]] = {}
        self.buffers: dict[Any, Any] = {}  # group -> (Cache, length)
        # a fast tokenizer may refuse concurrent use ("Already borrowed"): rendering (HTTP threads) and
        # decoding (scheduler) take turns
        self.tokenizer_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps of the running batch
        self._plan: contextlib.ExitStack | None = None  # the running batch's steering, open across steps
        self.plans_opened = 0  # steering plans of the running batch (one per batch composition, not per step)
        self.prefills = 0  # prefill forward passes (several joining prompts share one)

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ctxaware-serve", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the scheduler; requests still queued or running get a 503 error."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all(APIError("the server is shutting down", status=503, type="server_error", code="shutdown"))

    @property
    def running(self) -> int:
        return sum(len(rows) for rows in self.groups.values())

    @property
    def queued(self) -> int:
        return self.waiting.qsize()

    def submit(self, gen: Generation) -> None:
        """Queue ``gen``; raises a 503 :class:`APIError` when the queue is full or the engine stopped."""
        if self._stop.is_set():
            raise APIError("the server is shutting down", status=503, type="server_error", code="shutdown")
        if self.waiting.qsize() >= self.max_queue + max(0, self.max_concurrency - self.running):
            raise APIError(f"the server is busy ({self.running} running, {self.queued} queued); retry later",
                           status=503, type="server_error", code="queue_full")
        if gen.steering is not None:
            gen.emphasis = emphasis_mask(gen.rendered, gen.steering.emphasis_roles)[0].tolist()
        gen.generator = torch.Generator(device="cpu")
        if gen.seed is not None:
            gen.generator.manual_seed(int(gen.seed))
        else:
            gen.generator.seed()
        self.waiting.put(gen)
        self._wake.set()

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if not self.groups:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                for key in list(self.groups):
                    self._step(key)
            except Exception as exc:  # never let one bad step kill the server
                logger.exception("decoding failed")
                self._fail_all(APIError(f"internal error while decoding: {exc}", status=500, type="server_error",
                                        code="internal_error"), queued=False)
        self._close_plan()  # in this thread, where the plan was pushed

    def _fail_all(self, error: APIError, queued: bool = True) -> None:
        self._close_plan()
        for rows in list(self.groups.values()):
            for g in rows:
                self._finish(g, error=error)
        self.groups.clear()
        self.buffers.clear()
        while queued:
            try:
                self._finish(self.waiting.get_nowait(), error=error)
            except queue.Empty:
                break

    def _admit(self) -> None:
        joining: list[Generation] = []
        while self.running + len(joining) < self.max_concurrency:
            try:
                gen = self.waiting.get_nowait()
            except queue.Empty:
                break
            if not self._expired(gen):
                joining.append(gen)
        new: list[tuple[Generation, list]] = []
        for chunk in self._prefill_chunks(joining):
            try:
                kvs, logits = self._prefill(chunk)
            except Exception as exc:
                logger.exception("prefill failed")
                for gen in chunk:
                    self._finish(gen, error=APIError(f"internal error while reading the prompt: {exc}", status=500,
                                                     type="server_error", code="internal_error"))
                continue
            new += [(gen, kv) for gen, kv, row in zip(chunk, kvs, logits) if self._push(gen, row)]
        if new:
            self._rebuild(BATCH, new)

    def _prefill_chunks(self, gens: list[Generation]) -> list[list[Generation]]:
        """Joining prompts in groups prefilled together: sorted by length (little padding), each group's
        padded size (rows × longest prompt) within :attr:`prefill_tokens`."""
        chunks: list[list[Generation]] = []
        for gen in sorted(gens, key=lambda g: len(g.input_ids)):
            if chunks and len(gen.input_ids) * (len(chunks[-1]) + 1) <= self.prefill_tokens:
                chunks[-1].append(gen)
            else:
                chunks.append([gen])
        return chunks

    def _open_plan(self, rows: list[Generation], length: int) -> None:
        """Steer the running batch, and keep the block open across decoding steps until rows join or
        leave: keys past a row's emphasis (its generated tokens) are never biased, so the mask built at
        ``length`` holds for every later step, and the plan is built once, not per step."""
        if self._plan is not None or all(g.steering is None for g in rows):
            return
        emphasis = torch.ones(len(rows), length, dtype=torch.bool)
        for r, g in enumerate(rows):
            if g.emphasis is not None:
                emphasis[r, g.start:g.start + len(g.emphasis)] = torch.tensor(g.emphasis, dtype=torch.bool)
        stack = contextlib.ExitStack()
        stack.enter_context(self._steering_ctx(rows, emphasis))
        self._plan = stack
        self.plans_opened += 1

    def _close_plan(self) -> None:
        if self._plan is not None:
            stack, self._plan = self._plan, None
            stack.close()

    def _steering_ctx(self, rows: list[Generation], emphasis: Any) -> Any:
        if all(g.steering is None for g in rows):
            return contextlib.nullcontext()
        return steer_rows(self.model, [g.steering for g in rows], emphasis)

    def _prefill(self, gens: list[Generation]) -> tuple[list[list], torch.Tensor]:
        """One left-padded forward pass over the joining prompts, each row under its own steering;
        returns each row's per-layer (keys, values) (its last ``len(input_ids)`` positions are its
        prompt) and each row's next-token logits."""
        from transformers import DynamicCache

        self._close_plan()  # the running batch's plan must not steer the joining rows
        width = max(len(g.input_ids) for g in gens)
        cache = DynamicCache(config=self.model.config)
        x = torch.zeros(len(gens), width, dtype=torch.long)
        attn = torch.zeros(len(gens), width, dtype=torch.long)
        emphasis = torch.ones(len(gens), width, dtype=torch.bool)
        for r, g in enumerate(gens):
            n = len(g.input_ids)
            x[r, width - n:] = torch.tensor(g.input_ids)
            attn[r, width - n:] = 1
            if g.emphasis is not None:
                emphasis[r, width - n:] = torch.tensor(g.emphasis, dtype=torch.bool)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        padded = bool((attn == 0).any())
        with torch.inference_mode(), self._steering_ctx(gens, emphasis):
            out = self.model(input_ids=x.to(self.device), attention_mask=attn.to(self.device) if padded else None,
                             position_ids=pos.to(self.device), use_cache=True, logits_to_keep=1,
                             **{self.cache_arg: cache})
        self.prefills += 1
        kvs = [[(layer.keys[r:r + 1], layer.values[r:r + 1]) for layer in cache.layers] for r in range(len(gens))]
        return kvs, out.logits[:, -1]

    def _rebuild(self, key: Any, new: list[tuple[Generation, list]]) -> None:
        """A fresh left-padded buffer holding the group's running rows and the ``new`` ones."""
        from transformers.cache_utils import Cache

        self._close_plan()
        old_rows = self.groups.get(key, [])
        old_cache, length = self.buffers.get(key, (None, 0))
        trim = min((g.start for g in old_rows), default=0)
        width = max([length - trim] + [len(g.input_ids) for g, _ in new])
        rows = old_rows + [g for g, _ in new]
        capacity = width + max(g.max_tokens - len(g.tokens) for g in rows) + 1
        k0, v0 = new[0][1][0]
        layers = []
        for li in range(len(new[0][1])):
            layer = BufferLayer(len(rows), k0.shape[1], capacity, k0.shape[3], v0.shape[3], k0.dtype, k0.device)
            if old_rows:
                src = old_cache.layers[li]
                layer.kbuf[:len(old_rows), :, width - (length - trim):width] = src.kbuf[:, :, trim:length]
                layer.vbuf[:len(old_rows), :, width - (length - trim):width] = src.vbuf[:, :, trim:length]
            for r, (g, kv) in enumerate(new, start=len(old_rows)):
                k, v = kv[li]
                n = len(g.input_ids)
                layer.kbuf[r, :, width - n:width] = k[0, :, k.shape[2] - n:]
                layer.vbuf[r, :, width - n:width] = v[0, :, v.shape[2] - n:]
            layer.set_length(width)
            layers.append(layer)
        for g in old_rows:
            g.start += width - length
        for g, _ in new:
            g.start = width - len(g.input_ids)
        self.groups[key] = rows
        self.buffers[key] = (Cache(layers=layers), width)

    def _step(self, key: Any) -> None:
        rows = self.groups[key]
        cache, length = self.buffers[key]
        n = len(rows)
        attn = torch.zeros(n, length + 1, dtype=torch.long, device=self.device)
        for r, g in enumerate(rows):
            attn[r, g.start:] = 1
        pos = torch.tensor([[length - g.start] for g in rows], device=self.device)
        step_input = torch.tensor([[g.tokens[-1]] for g in rows], device=self.device)
        self._open_plan(rows, length)
        with torch.inference_mode():
            out = self.model(input_ids=step_input, attention_mask=attn, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self.cache_arg: cache})
        self.steps += 1
        self.buffers[key] = (cache, length + 1)
        logits = out.logits[:, -1]
        keep = [r for r, g in enumerate(rows) if self._push(g, logits[r])]
        if len(keep) < n:
            self._close_plan()
        if not keep:
            del self.groups[key], self.buffers[key]
        elif len(keep) < n:
            for layer in cache.layers:
                layer.select_rows(keep)
            self.groups[key] = [rows[r] for r in keep]

    # ------------------------------------------------------------------ one row
    def _expired(self, gen: Generation) -> bool:
        if gen.cancelled:
            self._finish(gen)
            return True
        if time.monotonic() > gen.deadline:
            self._finish(gen, error=APIError("the request timed out before it finished", status=504,
                                             type="server_error", code="timeout"))
            return True
        return False

    def _sample(self, gen: Generation, logits: torch.Tensor) -> int:
        if gen.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.double().cpu() / gen.temperature, dim=-1)
        if gen.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < gen.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen.generator))

    def _push(self, gen: Generation, logits: torch.Tensor) -> bool:
        """Add the row's next token and send its new text; False when the row is done."""
        if self._expired(gen):
            return False
        token = self._sample(gen, logits)
        gen.tokens.append(token)
        with self.tokenizer_lock:
            text = self.tokenizer.decode([t for t in gen.tokens if t not in self.eos], skip_special_tokens=True)
        hits = [p for p in (text.find(s) for s in gen.stop) if p >= 0]
        if hits:  # cut before the earliest stop string
            self._emit(gen, text[:min(hits)], final=True)
            self._finish(gen, "stop")
            return False
        if token in self.eos or len(gen.tokens) >= gen.max_tokens:  # held-back text goes out too
            self._emit(gen, text, final=True)
            self._finish(gen, "stop" if token in self.eos else "length")
            return False
        self._emit(gen, text)
        return True

    def _emit(self, gen: Generation, text: str, final: bool = False) -> None:
        """Send the text not sent yet, holding back what may be the start of a stop string or an
        incomplete character."""
        safe = len(text)
        if not final:
            if gen.stop:
                safe -= max(len(s) for s in gen.stop) - 1
            while safe > gen.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > gen.emitted:
            piece, gen.emitted = text[gen.emitted:safe], safe
            self._send(gen, "text", piece)

    @staticmethod
    def _send(gen: Generation, kind: str, value: Any) -> None:
        try:
            gen.sink(kind, value)
        except Exception:  # a sink whose client went away must not stop the others
            logger.debug("dropping output of a request whose client is gone", exc_info=True)
            gen.cancelled = True

    def _finish(self, gen: Generation, reason: str | None = None, error: APIError | None = None) -> None:
        if gen.finished:
            return
        gen.finished = True
        if error is not None:
            self._send(gen, "error", error)
        else:
            self._send(gen, "done", "cancelled" if gen.cancelled else (reason or "stop"))
