"""The one role-name map and the one message validation path shared by every command.

``spans``, ``chat``, ``attention``, ``score``, ``indicate``, ``train`` and ``eval`` all read
conversations through :func:`to_messages`, so a row is accepted or refused the same way everywhere.

Accepted shapes:

- Hugging Face / OpenAI ``messages``: ``[{"role", "content"}]``;
- ShareGPT ``conversations``: ``[{"from", "value"}]`` (``role``/``content`` keys also read there);
- Alpaca rows: ``{"instruction", "input", "output"}`` (see :func:`alpaca_messages`).

Role names (case and surrounding spaces ignored) go through :data:`ROLE_ALIASES`: ``human``,
``user``, ``prompter`` → ``user``; ``gpt``, ``assistant``, ``chatgpt``, ``bing``, ``bard``,
``model``, ``bot``, ``claude``, ``llama`` → ``assistant``; ``system`` → ``system``. Anything else is
refused (``unknown_role:<name>``) rather than guessed.

Content must be a string, or an OpenAI list of parts (``[{"type": "text", "text": ...}]`` or
plain strings), whose text parts are joined with no separator (exactly the text the user wrote);
a non-text part (image, audio) is refused (``non_text_content``) because no chat template renders
it as text. ``None``, numbers (``NaN`` included), dicts ... are refused (``non_string_content``).
Empty contents and consecutive messages of one role are kept: whether they render is the
template's call (a template that refuses them raises a :class:`~ctxaware.errors.TemplateError`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import InputError

ROLE_ALIASES: dict[str, str] = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant", "claude": "assistant", "llama": "assistant",
    "system": "system",
}


class MessageError(InputError):
    """A conversation cannot be read. ``reason`` is a short machine-readable code
    (``unknown_role:<r>``, ``non_string_content``, ``non_text_content``, ``malformed_message``,
    ``no_messages``, ``empty_conversation``); ``index`` the message (0-based) and ``field`` the key."""

    def __init__(self, reason: str, detail: str = "", *, index: int | None = None, field: str | None = None) -> None:
        self.reason, self.detail, self.index, self.field = reason, detail, index, field
        where = f"message {index}" if index is not None else "conversation"
        if field:
            where += f" field {field!r}"
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))


def canonical_role(name: Any) -> str | None:
    """``'Human'`` → ``'user'``, ``'gpt'`` → ``'assistant'`` ...; ``None`` for an unknown or non-string name."""
    if not isinstance(name, str):
        return None
    return ROLE_ALIASES.get(name.strip().lower())


def content_text(content: Any, *, index: int | None = None) -> str:
    """The text of a message content: a string as is, an OpenAI list of parts joined (see module doc)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        pieces = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise MessageError("non_text_content", f"part {j} is {kind!r}; only text parts "
                                   "({'type': 'text', 'text': ...}) can be rendered", index=index, field="content")
        return "".join(pieces)
    kind = "NaN" if isinstance(content, float) and content != content else type(content).__name__
    raise MessageError("non_string_content", f"got {kind}; content must be a string or a list of text parts",
                       index=index, field="content")


def alpaca_messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Alpaca ``{instruction, input, output}`` (``system`` optional) → messages: the user turn is the
    instruction, then a blank line and the input when the input is non-empty."""
    for key in ("instruction", "input", "output", "system"):
        if key in row and row[key] is not None and not isinstance(row[key], str):
            raise MessageError("non_string_content", f"Alpaca {key!r} is {type(row[key]).__name__}", field=key)
    user = row["instruction"] or ""
    if row.get("input"):
        user = f"{user}\n\n{row['input']}" if user else row["input"]
    msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"] or ""}]


def _as_mapping(m: Any, index: int) -> Mapping[str, Any]:
    if hasattr(m, "to_dict") and not isinstance(m, Mapping):
        m = m.to_dict()
    if not isinstance(m, Mapping):
        raise MessageError("malformed_message", f"expected a {{role, content}} object, got {type(m).__name__}",
                           index=index)
    return m


def to_messages(data: Any, *, allow_empty: bool = False) -> list[dict[str, str]]:
    """Validated plain ``[{role, content}]`` copies from any accepted shape (raises :class:`MessageError`).

    ``data`` may be a list of messages (HF or ShareGPT turns), or a row / object with a ``messages``
    or ``conversations`` list.
    """
    if isinstance(data, Mapping):
        if isinstance(data.get("messages"), (list, tuple)):
            data = data["messages"]
        elif isinstance(data.get("conversations"), (list, tuple)):
            data = data["conversations"]
        elif "instruction" in data and "output" in data:
            data = alpaca_messages(data)
        else:
            raise MessageError("no_messages", "expected a 'messages' or 'conversations' list, or Alpaca "
                               "'instruction'/'input'/'output' fields")
    if not isinstance(data, (list, tuple)):
        raise MessageError("no_messages", f"expected a list of {{role, content}} objects, got {type(data).__name__}")
    if not data and not allow_empty:
        raise MessageError("empty_conversation", "a conversation needs at least one message")
    out = []
    for i, raw in enumerate(data):
        m = _as_mapping(raw, i)
        key = "role" if "role" in m else "from" if "from" in m else None
        if key is None:
            raise MessageError("missing_role", "each message needs a 'role' (or ShareGPT 'from')", index=i,
                               field="role")
        role = canonical_role(m[key])
        if role is None:
            raise MessageError(f"unknown_role:{m[key]}", f"use one of {', '.join(sorted(ROLE_ALIASES))}",
                               index=i, field=key)
        ckey = "content" if "content" in m else "value" if "value" in m else None
        if ckey is None:
            raise MessageError("missing_content", "each message needs a 'content' (or ShareGPT 'value')",
                               index=i, field="content")
        out.append({"role": role, "content": content_text(m[ckey], index=i)})
    return out


def from_sharegpt(conversations: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """ShareGPT ``[{from, value}]`` → HF ``[{role, content}]`` through :data:`ROLE_ALIASES`."""
    return to_messages(list(conversations))
