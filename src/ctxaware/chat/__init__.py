"""Conversations rendered with a chat template, with the role of every token.

``render(tokenizer, messages)`` returns a :class:`RenderedChat`: token ids, one role per token
(``system``/``user``/``assistant``/``template``) and each message's content span. See
:mod:`ctxaware.chat.render` for how spans are derived from rendering.
"""

from __future__ import annotations

from .render import load_messages, pad_left, render, render_batch, validate_messages
from .roles import ROLE_ALIASES, MessageError, canonical_role, content_text, from_sharegpt, to_messages
from .types import MESSAGE_ROLES, ROLES, Message, RenderedChat, RoleSpan

__all__ = ["MESSAGE_ROLES", "ROLES", "ROLE_ALIASES", "Message", "MessageError", "canonical_role", "content_text",
           "to_messages", "RenderedChat", "RoleSpan", "from_sharegpt", "load_messages",
           "pad_left", "render", "render_batch", "validate_messages"]
