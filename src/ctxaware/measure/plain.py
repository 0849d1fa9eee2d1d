"""Rendering a conversation *without* a chat template (the paper's "no template" condition).

Definition: the contents of the messages, in order, empty ones skipped, joined by a single
newline ``"\\n"`` (:data:`PLAIN_SEPARATOR`) and tokenised as one text with the tokenizer's default
special tokens (so a tokenizer that prepends BOS on encode does so here too). Each token takes the
role of the message whose content it overlaps; separators and special tokens are ``template``.
No role markers, no default system prompt, no generation prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..chat import validate_messages
from ..chat.types import RenderedChat, RoleSpan
from ..errors import TemplateError

PLAIN_SEPARATOR = "\n"


def render_plain(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> RenderedChat:
    """A :class:`RenderedChat` of the raw concatenation of the message contents (see module doc).

    Raises :class:`~ctxaware.errors.InputError` for malformed messages (as ``render`` does).
    """
    messages = validate_messages(messages)
    pieces: list[str] = []
    ranges: list[tuple[int, str, int, int]] = []  # (message index, role, char start, char end)
    pos = 0
    for i, msg in enumerate(messages):
        content = msg["content"]
        if not content:
            continue
        if pieces:
            pieces.append(PLAIN_SEPARATOR)
            pos += len(PLAIN_SEPARATOR)
        ranges.append((i, msg["role"], pos, pos + len(content)))
        pieces.append(content)
        pos += len(content)
    text = "".join(pieces)
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("rendering without a template needs a fast tokenizer (offset mapping)")
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    roles = ["template"] * len(ids)
    spans: list[RoleSpan] = []
    turns: dict[str, int] = {}
    for msg_idx, role, cs, ce in ranges:
        toks = [t for t, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
        turn = turns.get(role, 0)
        turns[role] = turn + 1
        start, end = (min(toks), max(toks) + 1) if toks else (0, 0)
        for t in range(start, end):
            roles[t] = role
        spans.append(RoleSpan(role=role, turn=turn, message=msg_idx, start=start, end=end,
                              char_start=cs, char_end=ce))
    return RenderedChat(text=text, input_ids=ids, roles=roles, spans=spans, offsets=offsets,
                        messages=[dict(m) for m in messages])
