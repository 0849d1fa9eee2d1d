"""The ``[IND]`` indicator in training: detect it in data, strip it (vanilla baseline), add it as a token.

Context-dependent user turns carry a trailing ``" [IND]"`` (written by ``ctxaware indicate``).
For training, ``[IND]`` becomes one *special* token of the tokenizer (never split, skipped when
decoding replies), and its embedding row starts at the mean of the existing rows — of the input
embeddings and, when they are not tied, of the output embeddings too.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from ..scoring import INDICATOR, strip_indicator

logger = logging.getLogger(__name__)

__all__ = ["INDICATOR", "strip_indicator", "has_indicator", "count_indicated", "count_indicated_turns", "prepare_conversations",
           "indicator_token_id", "add_indicator_token"]


def has_indicator(messages: list[dict[str, Any]], indicator: str = INDICATOR) -> bool:
    """True when any user turn of ``messages`` contains ``indicator``."""
    return any(m.get("role") == "user" and indicator in str(m.get("content", "")) for m in messages)


def count_indicated(conversations: Iterable[list[dict[str, Any]]], indicator: str = INDICATOR) -> int:
    """Number of conversations with at least one indicated user turn."""
    return sum(has_indicator(c, indicator) for c in conversations)


def count_indicated_turns(conversations: Iterable[list[dict[str, Any]]],
                          indicator: str = INDICATOR) -> tuple[int, int]:
    """(user turns that contain ``indicator``, all user turns) over ``conversations``."""
    marked = total = 0
    for c in conversations:
        for m in c:
            if m.get("role") == "user":
                total += 1
                marked += indicator in str(m.get("content", ""))
    return marked, total


def prepare_conversations(conversations: list[list[dict[str, Any]]], *, indicator: bool) -> list[list[dict]]:
    """The conversations to train on: unchanged, or with ``[IND]`` stripped for the vanilla baseline."""
    if indicator:
        return conversations
    return [strip_indicator(c) for c in conversations]


def indicator_token_id(tokenizer, indicator: str = INDICATOR) -> int | None:
    """The id of ``indicator`` when it is a single added token of ``tokenizer``, else None."""
    ids = tokenizer.convert_tokens_to_ids([indicator])
    tid = ids[0] if ids else None
    if tid is None or tid == tokenizer.unk_token_id:
        return None
    return int(tid) if tokenizer.encode(indicator, add_special_tokens=False) == [tid] else None


def add_indicator_token(model, tokenizer, indicator: str = INDICATOR) -> int:
    """Add ``indicator`` as one special token; resize and mean-initialise its embedding row(s).

    Idempotent: a tokenizer that already has the token keeps its id (the model is only resized when
    its embedding matrix is too small). Returns the token id.
    """
    import torch

    old_len = len(tokenizer)
    tid = indicator_token_id(tokenizer, indicator)
    if tid is None:
        tokenizer.add_special_tokens({"extra_special_tokens": [indicator]}, replace_extra_special_tokens=False)
        tid = indicator_token_id(tokenizer, indicator)
        if tid is None:  # pragma: no cover - tokenizer-specific failure
            from ..errors import TemplateError

            raise TemplateError(f"could not add {indicator!r} as a single token to {type(tokenizer).__name__}")
    emb = model.get_input_embeddings()
    rows = emb.weight.shape[0]
    if tid < rows and len(tokenizer) == old_len:
        return tid  # already known to both tokenizer and model
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    n_old = min(old_len, rows)
    with torch.no_grad():
        inp = model.get_input_embeddings().weight
        inp[tid] = inp[:n_old].float().mean(dim=0).to(inp.dtype)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != inp.data_ptr():
            out.weight[tid] = out.weight[:n_old].float().mean(dim=0).to(out.weight.dtype)
            if getattr(out, "bias", None) is not None:
                out.bias[tid] = out.bias[:n_old].float().mean().to(out.bias.dtype)
    logger.info("added %s as special token %d (embedding row at the mean of %d rows)", indicator, tid, n_old)
    return tid
