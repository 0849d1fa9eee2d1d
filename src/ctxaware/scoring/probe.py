"""The context-dependency score of assistant turns (METHOD §3, "user attention ratio").

For assistant turn ``m`` of a conversation rendered with the probe model's chat template (an
empty system message is inserted first when there is none):

    s_m = mean_{t ∈ R_m} reduce_h Σ_{j ∈ U, j ≤ t} A_ℓ[h, t, j]

- ``U`` (keys): content tokens of the system message and of every user turn, without special
  tokens (BOS/EOS/role markers are ``template`` anyway) and, by default, without *bare newline*
  tokens (tokens made only of whitespace containing a line break), as the reference excludes
  its newline token.
- ``R_m`` (queries): the turn's content tokens through its closing end-of-turn token (template
  tokens between them, such as Llama-2's space before ``</s>``, included; see
  :mod:`ctxaware.measure.positions`).
- ``ℓ``: one layer, default ``int(num_layers * 15 / 22)`` (the paper's 15 of 22).
- ``reduce_h``: max over heads (default) or mean.

Undefined scores are ``None`` with a reason: ``empty_response``, ``no_user`` (no user turn before
it), ``truncated`` (its queries do not fit in the first ``max_length`` tokens).

Batches are right-padded and run without an attention mask through
:func:`ctxaware.measure.observe_mass`, which stops the forward pass inside layer ``ℓ``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..attention.backend import model_dims
from ..errors import ConfigError, CtxawareError
from ..measure.mechanism import observe_mass
from ..measure.positions import end_token_ids, pad_queries, response_positions, right_pad
from .config import ScoringConfig
from .io import RowError, row_messages

logger = logging.getLogger(__name__)


@dataclass
class RowScore:
    """Scores of one conversation: one entry per assistant message (``None`` = undefined).

    ``error`` is set (and ``scores``/``reasons`` are ``None``) when the whole row is unusable.
    """

    scores: list[float | None] | None
    reasons: list[str | None] | None
    error: str | None = None

    def to_columns(self) -> dict[str, Any]:
        return {"ctx_scores": self.scores, "ctx_score_reasons": self.reasons, "ctx_score_error": self.error}


def default_layer(num_layers: int) -> int:
    """The paper's layer 15 of 22 scaled to ``num_layers``: ``int(num_layers * 15 / 22)``."""
    return int(num_layers * 15 / 22)


@dataclass
class _Prepared:
    ids: list[int]
    keys: list[bool]
    turns: list[list[int]]  # query positions of each scorable turn
    turn_slots: list[int]  # index among assistant messages of each scorable turn
    row: RowScore


class Scorer:
    """Scores conversations with a probe model: ``Scorer(model, tokenizer, ScoringConfig()).score(messages)``."""

    def __init__(self, model, tokenizer, config: ScoringConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or ScoringConfig()
        n_layers, _ = model_dims(model)
        self.layer = default_layer(n_layers) if self.config.layer is None else self.config.layer
        if not 0 <= self.layer < n_layers:
            raise ConfigError(f"layer {self.layer} does not exist: the model has layers 0..{n_layers - 1}")
        self.end_ids = end_token_ids(model, tokenizer)
        self._special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = int(pad) if pad is not None else int(getattr(tokenizer, "eos_token_id", None) or 0)
        self._warned_system = False

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one scorer per run
    def _is_newline(self, token_id: int) -> bool:
        text = self.tokenizer.decode([token_id])
        return bool(text) and ("\n" in text or "\r" in text) and not text.strip()

    def _render(self, messages: list[dict[str, Any]]):
        from ..chat import render

        if self.config.insert_empty_system and messages[0]["role"] != "system":
            try:
                return render(self.tokenizer, [{"role": "system", "content": ""}, *messages]), 1
            except CtxawareError as exc:
                if not self._warned_system:
                    logger.warning("the chat template rejects an inserted empty system message (%s); "
                                   "scoring without it", exc)
                    self._warned_system = True
        return render(self.tokenizer, messages), 0

    def prepare(self, messages_or_row: Sequence[dict[str, Any]] | dict[str, Any]) -> _Prepared:
        """Render one conversation and find its keys and per-turn queries (no forward pass)."""
        try:
            row = messages_or_row if isinstance(messages_or_row, dict) else {"messages": list(messages_or_row)}
            messages = row_messages(row)
            n_assistant = sum(m["role"] == "assistant" for m in messages)
            if n_assistant == 0:
                raise RowError("no_assistant_turn")
            rendered, shift = self._render(messages)
        except RowError as exc:
            return _Prepared([], [], [], [], RowScore(None, None, exc.reason))
        except CtxawareError as exc:
            return _Prepared([], [], [], [], RowScore(None, None, f"render_error: {exc}"))
        limit = min(len(rendered.input_ids), self.config.max_length)
        ids = rendered.input_ids[:limit]
        keys = [rendered.roles[p] in ("system", "user") and ids[p] not in self._special
                and not (self.config.exclude_newlines and self._is_newline(ids[p])) for p in range(limit)]
        spans = {s.message - shift: s for s in rendered.spans}
        scores: list[float | None] = [None] * n_assistant
        reasons: list[str | None] = [None] * n_assistant
        turns, slots, slot, seen_user = [], [], -1, False
        for i, m in enumerate(messages):
            if m["role"] == "user":
                seen_user = True
            if m["role"] != "assistant":
                continue
            slot += 1
            span = spans.get(i)
            if not m["content"] or span is None or span.end <= span.start:
                reasons[slot] = "empty_response"
            elif not seen_user:
                reasons[slot] = "no_user"
            else:
                pos = response_positions(rendered, span, self.end_ids)
                if pos[-1] >= limit:
                    reasons[slot] = "truncated"
                else:
                    turns.append(pos)
                    slots.append(slot)
        return _Prepared(ids, keys, turns, slots, RowScore(scores, reasons))

    def _forward(self, batch: list[_Prepared]) -> None:
        """One forward pass (right-padded, no mask, stopped inside the scoring layer) for a batch."""
        ids = right_pad([p.ids for p in batch], pad_id=self._pad_id)
        width = ids.shape[1]
        chan = torch.zeros((len(batch), width, 1), dtype=torch.float32)
        for b, p in enumerate(batch):
            chan[b, :len(p.keys), 0] = torch.tensor(p.keys, dtype=torch.float32)
        flat = [[q for turn in p.turns for q in turn] for p in batch]
        qpos = pad_queries(flat, [0] * len(batch), width)
        mass = observe_mass(self.model, ids, None, qpos, chan, layers=[self.layer])[self.layer][..., 0]  # (B, H, Q)
        per_token = mass.amax(dim=1) if self.config.head_reduction == "max" else mass.mean(dim=1)
        per_token = per_token.double().cpu()
        for b, p in enumerate(batch):
            lo = 0
            for turn, slot in zip(p.turns, p.turn_slots):
                p.row.scores[slot] = float(per_token[b, lo:lo + len(turn)].mean())
                lo += len(turn)

    def iter_scores(self, conversations: Sequence[Sequence[dict[str, Any]] | dict[str, Any]]
                    ) -> Iterator[tuple[list[int], list[RowScore]]]:
        """Score conversations (message lists or rows) in length-bucketed batches.

        Yields ``(indices, row_scores)`` per batch as soon as it is done (indices into the input).
        """
        prepared = [self.prepare(c) for c in conversations]
        ready = [i for i, p in enumerate(prepared) if p.turns]
        idle = [i for i, p in enumerate(prepared) if not p.turns]
        if idle:
            yield idle, [prepared[i].row for i in idle]
        ready.sort(key=lambda i: len(prepared[i].ids))
        size = self.config.batch_size
        for lo in range(0, len(ready), size):
            chunk = ready[lo:lo + size]
            self._forward([prepared[i] for i in chunk])
            yield chunk, [prepared[i].row for i in chunk]

    def score_many(self, conversations: Sequence[Sequence[dict[str, Any]] | dict[str, Any]]) -> list[RowScore]:
        """Scores of each conversation, in input order."""
        out: list[RowScore | None] = [None] * len(conversations)
        for indices, rows in self.iter_scores(conversations):
            for i, r in zip(indices, rows):
                out[i] = r
        return out  # type: ignore[return-value]

    def score(self, messages: Sequence[dict[str, Any]] | dict[str, Any]) -> RowScore:
        """Scores of one conversation."""
        return self.score_many([messages])[0]


def score_conversation(model, tokenizer, messages: Sequence[dict[str, Any]], config: ScoringConfig | None = None,
                       **overrides: Any) -> list[float | None]:
    """Per-assistant-turn scores of one conversation (``None`` where undefined; see :class:`Scorer`)."""
    cfg = (config or ScoringConfig()).replace(**overrides) if overrides else (config or ScoringConfig())
    row = Scorer(model, tokenizer, cfg).score(messages)
    if row.error is not None:
        raise RowError(row.error)
    return list(row.scores or [])
