"""``measure_attention``: how much attention chosen query tokens pay to each role, per layer and head.

The result holds, for every selected layer and query head, the attention mass from the chosen
queries onto the tokens of each role (``system``, ``user``, ``assistant``, ``template``),
averaged over the queries. Every token has exactly one role and attention rows sum to one, so
the masses of one layer/head sum to one. See :mod:`ctxaware.measure.mechanism` for how the
mass is obtained without materialising attention matrices. ``role_shares`` is what
``ctxaware attention`` prints: per-layer shares with and without the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

from ..attention.backend import model_dims
from ..chat import pad_left, render, validate_messages
from ..chat.types import ROLES, RenderedChat
from ..errors import ConfigError, InputError
from .mechanism import observe_mass
from .plain import PLAIN_SEPARATOR, render_plain
from .positions import assistant_positions, end_token_ids, pad_queries, right_pad

Queries = Union[str, Sequence[int]]


@dataclass
class AttentionResult:
    """Attention mass of one conversation: ``mass[i, j, c]`` for ``layers[i]``, ``heads[j]``, ``channels[c]``.

    ``channels`` are the four roles (``keys_by_role=True``) or one label per content span
    (``"user[0]"``, ``"assistant[1]"``, ...) followed by ``"template"``. ``queries`` are the query
    positions in the conversation's own token coordinates; ``mass`` is averaged over them.
    With ``per_query=True``, ``query_mass[i, j, q, c]`` keeps each query separately (same order
    as ``queries``), e.g. to split ``queries="assistant"`` by turn.
    """

    layers: list[int]
    heads: list[int]
    channels: list[str]
    mass: torch.Tensor
    queries: list[int] = field(default_factory=list)
    query_mass: torch.Tensor | None = None

    def role(self, channel: str) -> torch.Tensor:
        """``(layers, heads)`` mass on one channel, e.g. ``result.role("user")``."""
        if channel not in self.channels:
            raise ConfigError(f"no channel {channel!r}; channels are {', '.join(self.channels)}")
        return self.mass[..., self.channels.index(channel)]

    def shares(self) -> dict[str, list[float]]:
        """Per channel, per layer: mass averaged over heads, normalised to sum to one per layer."""
        per_layer = self.mass.double().mean(dim=1)
        per_layer = per_layer / per_layer.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return {name: per_layer[:, c].tolist() for c, name in enumerate(self.channels)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: layers, heads, channels, queries, per-layer ``shares`` and the full ``mass``."""
        return {"layers": list(self.layers), "heads": list(self.heads), "channels": list(self.channels),
                "queries": list(self.queries), "shares": self.shares(), "mass": self.mass.tolist()}


def _query_positions(rendered: RenderedChat, queries: Queries, end_ids: set[int]) -> list[int]:
    n = len(rendered.input_ids)
    if isinstance(queries, str):
        if queries == "last":
            return [n - 1]
        if queries == "assistant":
            pos = assistant_positions(rendered, end_ids)
            if not pos:
                raise InputError("queries='assistant' but the conversation has no non-empty assistant turn")
            return pos
        raise ConfigError(f"queries must be 'last', 'assistant' or a list of positions, got {queries!r}")
    out = []
    for p in queries:
        q = int(p) + n if int(p) < 0 else int(p)
        if not 0 <= q < n:
            raise ConfigError(f"query position {p} is outside the conversation's {n} tokens")
        out.append(q)
    if not out:
        raise ConfigError("queries is an empty list")
    return out


def _channels(rendered: RenderedChat, keys_by_role: bool) -> tuple[list[str], torch.Tensor]:
    """Channel names and the ``(T, C)`` one-hot key matrix of one conversation."""
    n = len(rendered.input_ids)
    if keys_by_role:
        index = {r: i for i, r in enumerate(ROLES)}
        try:
            cols = torch.tensor([index[r] for r in rendered.roles], dtype=torch.long)
        except KeyError as exc:
            raise InputError(f"unknown token role {exc.args[0]!r} in the rendered chat") from exc
        names = list(ROLES)
    else:
        spans = sorted(rendered.spans, key=lambda s: s.start)
        names = [f"{s.role}[{s.turn}]" for s in spans] + ["template"]
        cols = torch.full((n,), len(spans), dtype=torch.long)
        for c, s in enumerate(spans):
            cols[s.start:s.end] = c
    onehot = torch.zeros((n, len(names)), dtype=torch.float32)
    onehot[torch.arange(n), cols] = 1.0
    return names, onehot


def measure_attention(model, rendered: RenderedChat | Sequence[RenderedChat], *, queries: Queries = "last",
                      layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                      keys_by_role: bool = True, tokenizer: Any = None, batch_size: int = 8,
                      padding: str = "right", per_query: bool = False,
                      ) -> AttentionResult | list[AttentionResult]:
    """Attention mass from the chosen queries onto each role, per layer and head.

    ``rendered``: one :class:`~ctxaware.chat.RenderedChat` (returns one result) or a list
    (returns a list in the same order; conversations are padded into batches of ``batch_size``).
    ``queries``: ``"last"`` (the last token, i.e. the one predicting the next token),
    ``"assistant"`` (every assistant turn's content tokens and its closing end-of-turn token) or
    explicit positions (negative = from the end). ``layers``/``heads``: indices (default all);
    the forward pass stops inside the deepest requested layer. ``keys_by_role=False`` gives one
    channel per message span instead of per role. ``tokenizer`` (optional) adds its special
    tokens to the end-of-turn ids used by ``"assistant"``. ``padding``: ``"right"`` (default: no
    padding mask is built at all) or ``"left"`` (with an attention mask and positions from it);
    both give each conversation's own numbers. ``per_query`` keeps every query's mass too.

    Memory: no ``T × T`` matrix; see :mod:`ctxaware.measure.mechanism`.
    """
    single = isinstance(rendered, RenderedChat)
    items = [rendered] if single else list(rendered)
    if not items:
        return []
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if padding not in ("right", "left"):
        raise ConfigError(f"padding must be 'right' or 'left', got {padding!r}")
    n_layers, n_heads = model_dims(model)
    layer_list = list(range(n_layers)) if layers is None else sorted(set(int(x) for x in layers))
    head_list = list(range(n_heads)) if heads is None else sorted(set(int(h) for h in heads))
    end_ids = end_token_ids(model, tokenizer)
    for r in items:
        if not r.input_ids:
            raise InputError("cannot measure attention on an empty conversation")
    positions_all = [_query_positions(r, queries, end_ids) for r in items]
    results: list[AttentionResult] = []
    for lo in range(0, len(items), batch_size):
        batch = items[lo:lo + batch_size]
        positions = positions_all[lo:lo + batch_size]
        if padding == "left":
            ids, mask, offsets = pad_left(batch)
        else:
            ids, mask, offsets = right_pad([r.input_ids for r in batch]), None, [0] * len(batch)
        width = ids.shape[1]
        named = [_channels(r, keys_by_role) for r in batch]
        n_ch = max(m.shape[1] for _, m in named)
        chan = torch.zeros((len(batch), width, n_ch), dtype=torch.float32)
        for b, ((_, m), off) in enumerate(zip(named, offsets)):
            chan[b, off:off + m.shape[0], :m.shape[1]] = m
        qpos = pad_queries(positions, offsets, width)
        observed = observe_mass(model, ids, mask, qpos, chan, layers=layer_list,
                                heads=None if heads is None else head_list)
        stacked = torch.stack([observed[x].float().cpu() for x in layer_list], dim=1)  # (B, L, H, Q, C)
        for b, (names, _) in enumerate(named):
            per_q = stacked[b, :, :, :len(positions[b]), :len(names)]
            results.append(AttentionResult(layers=layer_list, heads=head_list, channels=names,
                                           mass=per_q.mean(dim=2), queries=positions[b],
                                           query_mass=per_q.clone() if per_query else None))
    return results[0] if single else results


def role_shares(model, tokenizer, messages: Sequence[dict[str, Any]], *, queries: str = "last",
                layers: Sequence[int] | None = None, compare_template: bool = False) -> dict[str, Any]:
    """Per-layer share of attention on each role, with the chat template and (``compare_template``) without.

    What ``ctxaware attention`` prints. ``queries="last"`` renders with the generation prompt when
    the conversation ends with a user turn. Returns ``{"queries", "layers", "conditions": {"template":
    {"tokens", "queries", "shares": {role: [per layer]}}, "no_template": ...}}``.
    """
    messages = validate_messages(messages)
    gen = queries == "last" and messages[-1]["role"] != "assistant"
    conditions = {"template": render(tokenizer, messages, add_generation_prompt=gen)}
    if compare_template:
        conditions["no_template"] = render_plain(tokenizer, messages)
    out = {"queries": queries, "layers": None, "conditions": {}}
    for name, rendered in conditions.items():
        res = measure_attention(model, rendered, queries=queries, layers=layers, tokenizer=tokenizer)
        out["layers"] = res.layers
        out["conditions"][name] = {"tokens": len(rendered.input_ids), "queries": len(res.queries),
                                   "shares": res.shares()}
    if compare_template:
        out["no_template_definition"] = f"message contents joined by {PLAIN_SEPARATOR!r}, tokenizer defaults"
    return out
