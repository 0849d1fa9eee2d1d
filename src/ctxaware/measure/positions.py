"""Token positions used by measurement and scoring: response queries, end-of-turn tokens, padding.

A *response* (the queries of an assistant turn) is its content tokens plus its closing
end-of-turn token. The closing token is found from the rendering itself: among the template
tokens that directly follow the content (up to the next content span), the first one that is an
end-of-turn/special token (``<|im_end|>``, ``</s>``, ``<|eot_id|>``, ``<end_of_turn>`` ...) is
included, together with any template tokens before it. If that run holds no such token, the
response is its content only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..chat.types import RenderedChat, RoleSpan


def end_token_ids(model: Any = None, tokenizer: Any = None) -> set[int]:
    """Ids that close a turn: the tokenizer's special tokens and every configured eos id."""
    ids: set[int] = set()
    if tokenizer is not None:
        ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


def response_positions(rendered: RenderedChat, span: RoleSpan, end_ids: set[int]) -> list[int]:
    """Positions of an assistant turn's queries: content tokens + its closing end-of-turn token."""
    positions = list(range(span.start, span.end))
    next_start = min((s.start for s in rendered.spans if s.start >= span.end and s is not span),
                     default=len(rendered.input_ids))
    for pos in range(span.end, next_start):
        if rendered.roles[pos] != "template":
            break
        if rendered.input_ids[pos] in end_ids:
            positions.extend(range(span.end, pos + 1))
            break
    return positions


def assistant_positions(rendered: RenderedChat, end_ids: set[int]) -> list[int]:
    """Query positions of every non-empty assistant turn (see :func:`response_positions`)."""
    out: list[int] = []
    for span in rendered.spans_of("assistant"):
        if span.end > span.start:
            out.extend(response_positions(rendered, span, end_ids))
    return out


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """Right-pad id lists into ``(B, max_len)``; real tokens keep their own positions (offset 0)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for b, seq in enumerate(sequences):
        if seq:
            ids[b, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    return ids


def pad_queries(per_row: Sequence[Sequence[int]], offsets: Sequence[int], width: int) -> torch.Tensor:
    """``(B, Q)`` query positions in padded coordinates (``offsets[b]`` added, 0 for right padding).

    Rows with fewer queries repeat their last one (an empty row uses ``offsets[b]``); callers keep
    only the first ``len(per_row[b])`` results of each row.
    """
    n_q = max(1, max((len(p) for p in per_row), default=0))
    out = torch.empty((len(per_row), n_q), dtype=torch.long)
    for b, (pos, off) in enumerate(zip(per_row, offsets)):
        real = [p + off for p in pos] or [min(off, width - 1)]
        out[b, :len(real)] = torch.tensor(real, dtype=torch.long)
        out[b, len(real):] = real[-1]
    return out
