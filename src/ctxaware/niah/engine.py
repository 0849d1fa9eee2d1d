"""Greedy answers for many long prompts that share prefixes: what makes an NIH study fast.

Two things cost time in an NIH grid: the prefill of long prompts and the decoding steps.
:class:`GreedyEngine` cuts both while keeping plain greedy decoding:

* **Prefix sharing.** Prompts are taken in lexicographic order of their token ids (the
  depth-first order of their prefix trie) and one KV cache is kept: before each prompt the cache is
  cropped to the prefix it shares with the previous one, so every distinct prefix is prefilled about once.
  Prefill chunks start at multiples of ``chunk`` and only whole chunks of the shared prefix are reused,
  so a prompt's cache is bit for bit the one it would compute alone: an answer depends on its
  decoding batch (:meth:`GreedyEngine.plan`) and nothing else. In an NIH grid all cells share
  template and instruction, and the cells of one length share the haystack up to their needle. With a cache, the attention mask is no longer plain causal and SDPA computes every query × key
  pair of a chunk, so chunks keep that waste small (and bound the activation memory).
* **Batched decoding.** The batches are planned before any prefill, from all prompts (:meth:`GreedyEngine.plan`):
  the KV caches of up to ``batch_size`` prefilled prompts (whose padded batch cache fits in
  ``batch_memory`` GiB) are gathered into one left-padded, preallocated cache and
  decoded together, one token per row and step; a row is reported, and leaves the batch, as soon
  as it ends. A decoding step reads the weights once for the whole batch.

The cache tensors of a prompt are kept by reference until its batch is decoded: a plain
``DynamicLayer`` never writes into a tensor it has returned (``update`` concatenates, ``crop``
slices), so the next prompt's prefill leaves them intact. Caches of other kinds (sliding-window,
quantised, static) cannot be shared like this; for such models the engine falls back to one
``model.generate`` per prompt.

Prompts that are steered (``ctxaware.steering``) only share caches with prompts steered the same way
and emphasising the same tokens of the shared prefix; their decoding batch is steered with each
row's own emphasis.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers.cache_utils import DynamicLayer

from ..chat.render import common_prefix
from ..steering.model import greedy_generation_config

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One prompt to answer: its rendering (``input_ids``, role spans) and whether it is steered."""

    rendered: Any
    steer: bool = False
    tag: Any = None
    # filled by the engine
    emphasis: list[bool] | None = None
    first_token: int = -1
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    new_tokens: int = 0  # tokens generated (the end-of-sequence token included when reached)
    truncated: bool = False  # stopped by max_new_tokens, not by an end-of-sequence token


class GreedyEngine:
    """Greedy decoding of many prompts with shared-prefix prefill and batched decoding.

    ``steer_config``: the :class:`~ctxaware.steering.SteeringConfig` applied to jobs with
    ``steer=True``. ``reuse=False`` prefills every prompt from scratch (decoding is still batched);
    ``batch_size=1`` decodes one prompt at a time. ``batch_memory`` (GiB) bounds the decoding
    batch's KV cache (rows × longest prompt × bytes per token); while a batch is gathered its
    prompts' own caches are held too, so the peak is about twice that.
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, *, steer_config: Any = None,
                 reuse: bool = True, batch_size: int = 8, batch_memory: float = 4.0, chunk: int = 256) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if min(batch_size, chunk) < 1 or not batch_memory > 0:
            raise ValueError(f"batch_size and chunk must be at least 1 and batch_memory positive, got {batch_size}, "
                             f"{chunk} and {batch_memory}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.steer_config = max_new_tokens, steer_config
        self.reuse, self.batch_size, self.chunk = reuse, batch_size, chunk
        self.batch_bytes = int(batch_memory * 2**30)
        self.generation_config = greedy_generation_config(model, tokenizer, max_new_tokens)
        eos = self.generation_config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else eos)
        self.device = next(model.parameters()).device
        self.shareable = self._plain_dynamic_cache()
        # transformers >= 5.23 names the forward argument ``cache`` (``past_key_values`` is deprecated)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # what the work cost, for tests and benchmarks
        self.prefilled_tokens, self.prefill_seconds, self.decode_seconds, self.decode_steps = 0, 0.0, 0.0, 0
        if not self.shareable:
            logger.info("%s uses a KV cache that cannot be cropped and shared; answering one prompt at a time",
                        type(model).__name__)

    # ------------------------------------------------------------------ helpers
    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _plain_dynamic_cache(self) -> bool:
        try:
            layers = self._new_cache().layers
        except Exception:  # pragma: no cover - exotic configs
            return False
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _steering(self, emphasis: Any, steer: bool) -> Any:
        if not steer or self.steer_config is None:
            return contextlib.nullcontext()
        from ..steering import steer as steer_ctx

        return steer_ctx(self.model, self.steer_config, emphasis)

    def _emphasis_row(self, job: Job) -> list[bool]:
        if not job.steer or self.steer_config is None:
            return []
        from ..steering.context import emphasis_mask

        return emphasis_mask(job.rendered, self.steer_config.emphasis_roles)[0].tolist()

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ main loop
    def order(self, jobs: Iterable[Job]) -> list[Job]:
        """The order jobs are prefilled in: steered after unsteered, each group by token ids."""
        return sorted(jobs, key=lambda j: (j.steer, list(j.rendered.input_ids)))

    def plan(self, jobs: Sequence[Job]) -> list[list[Job]]:
        """The decoding batches of ``jobs``, before any prefill: :meth:`order`, cut where steering changes, where a
        batch holds ``batch_size`` jobs, or where its cache (rows x longest prompt x KV bytes per token, a
        property of the model and dtype) would exceed ``batch_memory``. The plan depends on the jobs and these
        settings only (never on the machine), and :meth:`run_batches` gives each prompt the cache it would compute
        alone, so a job's answer depends on its batch alone: shards given whole batches of one plan answer exactly
        as one process running the whole plan, and a batch rerun after a kill answers as before."""
        batches: list[list[Job]] = []
        per_token = self._kv_bytes_per_token_probe() if self.shareable and jobs else 0
        for job in self.order(jobs):
            cur = batches[-1] if batches else None
            if cur and cur[0].steer == job.steer and len(cur) < self.batch_size:
                width = max(len(j.rendered.input_ids) for j in [*cur, job])
                if (len(cur) + 1) * width * per_token <= self.batch_bytes:
                    cur.append(job)
                    continue
            batches.append([job])
        return batches

    def run(self, jobs: Sequence[Job], on_done: Callable[[Job, str], None]) -> None:
        """Answer every job (batches of :meth:`plan`); ``on_done(job, answer)`` is called as soon as a job's answer
        ends (``job.seconds`` holds its prefill time plus its share of each decoding step it took part in,
        ``job.new_tokens`` the tokens it generated, ``job.truncated`` whether ``max_new_tokens`` stopped it)."""
        self.run_batches(self.plan(jobs), on_done)

    def run_batches(self, batches: Sequence[Sequence[Job]], on_done: Callable[[Job, str], None]) -> None:
        """Answer the batches of a :meth:`plan` (all of them, or a shard's share), in order.

        A prompt is prefilled in chunks that start at multiples of ``chunk`` (absolute positions), and the
        cache kept from the previous prompt is reused only up to a multiple of ``chunk`` within the shared
        prefix: those positions were computed from the same tokens in a chunk of the same span, so their keys
        and values are bit for bit what this prompt would compute itself. A prompt's cache, hence its answer,
        does not depend on which prompt came before it (another batch, another shard, an interrupted run).
        """
        if not self.shareable:
            for job in (j for batch in batches for j in batch):
                t0 = time.perf_counter()
                answer = self._generate_one(job)
                job.seconds = time.perf_counter() - t0
                on_done(job, answer)
            return
        cache, cached_ids, cached_emph, cached_steer = None, [], [], None
        with torch.inference_mode():
            for batch in batches:
                for job in batch:
                    t0 = time.perf_counter()
                    ids = list(job.rendered.input_ids)
                    if not ids:
                        raise ValueError("cannot answer an empty prompt")
                    job.emphasis = self._emphasis_row(job)
                    if cache is None or not self.reuse or cached_steer != job.steer:
                        cache, cached_ids, cached_emph = self._new_cache(), [], []
                    keep = common_prefix(cached_ids, ids)
                    if job.steer:
                        keep = min(keep, common_prefix(cached_emph, job.emphasis))
                    keep = min(keep, len(ids) - 1) // self.chunk * self.chunk  # whole chunks only
                    if cache.get_seq_length() > keep:
                        cache.crop(keep - cache.get_seq_length())
                    logits = self._prefill(cache, ids, keep, job)
                    job.first_token = int(logits.argmax(-1))
                    job.kv = [(layer.keys, layer.values) for layer in cache.layers]
                    cached_ids, cached_emph, cached_steer = ids, job.emphasis, job.steer
                    job.seconds = time.perf_counter() - t0
                    self.prefill_seconds += job.seconds
                self._decode_batch(list(batch), on_done)

    def _kv_bytes_per_token_probe(self) -> int:
        """KV-cache bytes per token of this model and dtype, from a one-token forward (machine-independent)."""
        if getattr(self, "_per_token", None) is None:
            cache = self._new_cache()
            with torch.inference_mode():
                self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), use_cache=True,
                           logits_to_keep=1, **{self.cache_arg: cache})
            self._per_token = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        return self._per_token

    def _prefill(self, cache: Any, ids: list[int], start: int, job: Job) -> torch.Tensor:
        """Run ``ids[start:]`` into ``cache`` (holding ``ids[:start]``); returns the last position's logits."""
        x = torch.tensor([ids], device=self.device)
        logits = None
        with self._steering(job.rendered, job.steer):
            pos = start
            while pos < len(ids):
                # chunks at multiples of ``chunk``: the same spans whatever was cached (see run_batches)
                end = min(len(ids), (pos // self.chunk + 1) * self.chunk)
                out = self.model(input_ids=x[:, pos:end], use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})
                logits = out.logits[0, -1]
                self.prefilled_tokens += end - pos
                pos = end
        return logits

    def _decode_batch(self, jobs: list[Job], on_done: Callable[[Job, str], None]) -> None:
        """Greedy-decode the prefilled ``jobs`` together (left-padded cache), reporting each as it ends."""
        t0 = time.perf_counter()
        n = len(jobs)
        lengths = [len(j.rendered.input_ids) for j in jobs]
        width = max(lengths)
        from transformers.cache_utils import Cache

        layers = []
        for li in range(len(jobs[0].kv)):
            k0, v0 = jobs[0].kv[li]
            layer = BufferLayer(n, k0.shape[1], width + self.max_new_tokens, k0.shape[3], v0.shape[3], k0.dtype,
                                k0.device)
            for r, job in enumerate(jobs):
                k, v = job.kv[li]
                layer.kbuf[r, :, width - lengths[r]:width] = k[0, :, :lengths[r]]
                layer.vbuf[r, :, width - lengths[r]:width] = v[0, :, :lengths[r]]
            layer.set_length(width)
            layers.append(layer)
        cache = Cache(layers=layers)
        for job in jobs:
            job.kv = []
        pad = torch.zeros(n, width, dtype=torch.long, device=self.device)
        for r, length in enumerate(lengths):
            pad[r, width - length:] = 1
        emphasis = None
        if jobs[0].steer and self.steer_config is not None:
            emphasis = torch.zeros(n, width, dtype=torch.bool)
            for r, job in enumerate(jobs):
                emphasis[r, width - lengths[r]:] = torch.tensor(job.emphasis, dtype=torch.bool)
        tokens = [[j.first_token] for j in jobs]
        jobs[0].seconds += time.perf_counter() - t0  # gathering the cache

        def report(rows: list[int]) -> None:
            for r in rows:
                self._finish(jobs[r], tokens[r])
                on_done(jobs[r], self._decode_text(tokens[r]))

        active = [r for r in range(n) if _decoding(tokens[r], self.eos, self.max_new_tokens)]
        if len(active) < n:
            self._select(cache, active)
            report([r for r in range(n) if r not in active])
        attn = pad[active]
        pos = torch.tensor([lengths[r] for r in active], device=self.device)
        step_input = torch.tensor([[tokens[r][-1]] for r in active], device=self.device)
        while active:
            ctx = self._steering(emphasis[active] if emphasis is not None else None, emphasis is not None)
            finished: list[int] = []
            with ctx:
                while active and not finished:
                    t_step = time.perf_counter()
                    attn = torch.cat([attn, attn.new_ones(len(active), 1)], dim=1)
                    out = self.model(input_ids=step_input, attention_mask=attn, position_ids=pos[:, None],
                                     use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})
                    nxt = out.logits[:, -1].argmax(-1).tolist()
                    self.decode_steps += 1
                    share = (time.perf_counter() - t_step) / len(active)
                    for i, r in enumerate(active):
                        tokens[r].append(nxt[i])
                        jobs[r].seconds += share
                        if not _decoding(tokens[r], self.eos, self.max_new_tokens):
                            finished.append(i)
                    pos = pos + 1
                    step_input = torch.tensor([[t] for t in nxt], device=self.device)
            if finished:
                report([active[i] for i in finished])
                gone = set(finished)
                keep = [i for i in range(len(active)) if i not in gone]
                active = [active[i] for i in keep]
                if active:
                    self._select(cache, keep)
                    attn, pos, step_input = attn[keep], pos[keep], step_input[keep]
        self.decode_seconds += time.perf_counter() - t0

    def _finish(self, job: Job, tokens: list[int]) -> None:
        """Record how many tokens ``job`` generated and whether the budget, not an end token, stopped it."""
        job.new_tokens = len(tokens)
        job.truncated = bool(tokens) and tokens[-1] not in self.eos and len(tokens) >= self.max_new_tokens

    @staticmethod
    def _select(cache: Any, rows: list[int]) -> None:
        """Keep only ``rows`` of every layer of a batched cache."""
        for layer in cache.layers:
            layer.select_rows(rows)

    def _generate_one(self, job: Job) -> str:
        ids = torch.tensor([list(job.rendered.input_ids)], device=self.device)
        with self._steering(job.rendered, job.steer), torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=self.generation_config)
        self.prefilled_tokens += ids.shape[1]
        tokens = out[0, ids.shape[1]:].tolist()
        pad = self.generation_config.pad_token_id
        while len(tokens) > 1 and tokens[-1] == pad and tokens[-2] in self.eos:
            tokens.pop()  # generate pads after the end token only in batches; be safe
        self._finish(job, tokens)
        return self._decode_text(tokens)


class BufferLayer(DynamicLayer):
    """A cache layer over a preallocated ``(B, H, capacity, D)`` buffer: decoding writes each new key
    in place, where ``DynamicLayer`` concatenates, i.e. copies the whole past, at every step (on a
    CPU that copy costs more than the attention itself for a batch of long prompts)."""

    def __init__(self, batch: int, heads: int, capacity: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.kbuf = torch.zeros(batch, heads, capacity, k_dim, dtype=dtype, device=device)
        self.vbuf = torch.zeros(batch, heads, capacity, v_dim, dtype=dtype, device=device)
        self.device, self.is_initialized, self.length = device, True, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the buffers exist from the start

    def set_length(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self.kbuf[:, :, :length], self.vbuf[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self.length + n > self.kbuf.shape[2]:
            raise RuntimeError(f"decoding buffer of {self.kbuf.shape[2]} positions is full")
        self.kbuf[:, :, self.length:self.length + n] = key_states
        self.vbuf[:, :, self.length:self.length + n] = value_states
        self.set_length(self.length + n)
        return self.keys, self.values

    def select_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.kbuf.device)
        self.kbuf, self.vbuf = self.kbuf[index], self.vbuf[index]
        self.set_length(self.length)


def _decoding(tokens: list[int], eos: set[int], max_new_tokens: int) -> bool:
    """Whether a row still decodes: no end-of-sequence token yet and budget left."""
    return tokens[-1] not in eos and len(tokens) < max_new_tokens
