"""Data types for rendered conversations: messages, role spans and the rendered chat.

A :class:`RenderedChat` is what :func:`ctxaware.chat.render` returns: the token ids of a
conversation rendered with a chat template, the role of every token (``system``, ``user``,
``assistant`` or ``template``), and one :class:`RoleSpan` per message giving the half-open token
range ``[start, end)`` of that message's *content* (role markers excluded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

Role = Literal["system", "user", "assistant", "template"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "template")
MESSAGE_ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat message in Hugging Face ``messages`` format."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class RoleSpan:
    """Content tokens ``[start, end)`` of message number ``message`` (0-based), with its role.

    ``turn`` counts messages of the same role: the first user message is user turn 0, the
    second user turn 1, and so on. ``char_start``/``char_end`` locate the content in
    :attr:`RenderedChat.text`.
    """

    role: str
    turn: int
    message: int
    start: int
    end: int
    char_start: int = 0
    char_end: int = 0

    def __len__(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "turn": self.turn, "message": self.message,
                "start": self.start, "end": self.end}


@dataclass
class RenderedChat:
    """A conversation rendered with a chat template.

    ``roles[i]`` is the role of token ``i``; tokens outside every content span are ``template``.
    ``prompt_len`` is the number of tokens that make up the prompt (equal to ``len(input_ids)``
    for a rendered prompt; steering never down-weights keys at or beyond it). ``straddling`` lists
    the tokens that mix a content's characters with template characters: by policy they are
    ``template`` tokens outside every span (see :mod:`ctxaware.chat.render`).
    """

    text: str
    input_ids: list[int]
    roles: list[str]
    spans: list[RoleSpan]
    offsets: list[tuple[int, int]] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    straddling: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    def spans_of(self, role: str) -> list[RoleSpan]:
        return [s for s in self.spans if s.role == role]

    def role_mask(self, roles: str | Iterable[str]) -> list[bool]:
        """Per-token booleans: True where the token's role is in ``roles``."""
        wanted = {roles} if isinstance(roles, str) else set(roles)
        return [r in wanted for r in self.roles]

    def to_dict(self, tokenizer=None) -> dict[str, Any]:
        """JSON-ready dict. Each span's ``text`` is the content exactly as rendered (characters); with a
        tokenizer it also carries ``token_text``, the decoded span tokens. ``straddling`` lists the
        boundary tokens (index, exact characters, the message they touch), counted as template."""
        spans = []
        for s in self.spans:
            d = s.to_dict()
            d["text"] = self.text[s.char_start:s.char_end]
            if tokenizer is not None:
                d["token_text"] = tokenizer.decode(self.input_ids[s.start:s.end])
            spans.append(d)
        straddling = []
        for t in self.straddling:
            a, b = self.offsets[t] if t < len(self.offsets) else (0, 0)
            touched = [s.message for s in self.spans if a < s.char_end and b > s.char_start]
            straddling.append({"token": t, "text": self.text[a:b], "char_start": a, "char_end": b,
                               "message": touched[0] if touched else None, "role": "template"})
        return {"text": self.text, "input_ids": list(self.input_ids), "roles": list(self.roles),
                "spans": spans, "straddling": straddling}
