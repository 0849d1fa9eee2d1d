"""NIH prompts: the user message of METHOD §5 rendered for each mode, with role spans.

``chat`` renders ``[system, user]`` with the tokenizer's chat template and a generation prompt.
The system message is empty unless ``system`` is given (pass ``system_message=False`` to send
none, which lets templates such as SmolLM2's insert their own default system prompt).
``+prefix`` opens the assistant's answer with the needle's first 8 words
(``continue_final_message``); the answer scored is what the model generates after it. ``raw`` is
the user text with no template, tokenised with the tokenizer's own special tokens (BOS if it adds
one, never twice); with ``+prefix`` the prefix follows after a blank line, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..chat.types import RenderedChat, RoleSpan
from .config import parse_mode
from .needles import Needle

USER_TEMPLATE = ("You are a helpful AI assistant that answers a question using only the provided document: "
                 "\n{context}\n\nQuestion: {question}")


@dataclass
class Prompt:
    """A rendered prompt of one cell, and the response prefix it opens with ('' if none)."""

    rendered: RenderedChat
    prefix: str
    steer: bool


def build_messages(context: str, needle: Needle, mode: str, *, system: str = "",
                   system_message: bool = True) -> list[dict[str, str]]:
    """The chat messages of one cell (system, user, and the assistant prefix for ``+prefix``)."""
    _, flags = parse_mode(mode)
    question = needle.with_indicator().question if "ind" in flags else needle.question
    messages = [{"role": "system", "content": system}] if system_message or system else []
    messages.append({"role": "user", "content": USER_TEMPLATE.format(context=context, question=question)})
    if "prefix" in flags:
        messages.append({"role": "assistant", "content": needle.prefix})
    return messages


def render_raw(tokenizer: Any, messages: list[dict[str, str]]) -> RenderedChat:
    """Render the user (and optional assistant prefix) text without a template, roles by hand."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    prefix = next((m["content"] for m in messages if m["role"] == "assistant"), None)
    text = user if prefix is None else user + "\n\n" + prefix
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:  # never a double BOS
        ids = ids[1:]
        offsets = [tuple(o) for o in enc["offset_mapping"][1:]]
    else:
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    roles: list[str] = []
    for t, (s, e) in zip(ids, offsets):
        if t in special and s == e:
            roles.append("template")
        elif prefix is not None and s >= len(user) + 2:
            roles.append("assistant")
        elif prefix is not None and s >= len(user):
            roles.append("template")  # the blank line between question and prefix
        else:
            roles.append("user")
    spans = []
    for role, message, (c0, c1) in (("user", len(messages) - (2 if prefix is not None else 1), (0, len(user))),
                                    ("assistant", len(messages) - 1, (len(user) + 2, len(text)))):
        idx = [i for i, r in enumerate(roles) if r == role]
        if idx:
            spans.append(RoleSpan(role, 0, message, idx[0], idx[-1] + 1, c0, c1))
    return RenderedChat(text=text, input_ids=ids, roles=roles, spans=spans, offsets=offsets,
                        messages=[dict(m) for m in messages])


def build_prompt(tokenizer: Any, context: str, needle: Needle, mode: str, *, system: str = "",
                 system_message: bool = True) -> Prompt:
    """Render the prompt of one cell in ``mode``."""
    base, flags = parse_mode(mode)
    messages = build_messages(context, needle, mode, system=system, system_message=system_message)
    if base == "raw":
        rendered = render_raw(tokenizer, messages)
    else:
        from ..chat import render

        prefix = "prefix" in flags
        rendered = render(tokenizer, messages, add_generation_prompt=not prefix, continue_final_message=prefix)
    return Prompt(rendered=rendered, prefix=needle.prefix if "prefix" in flags else "", steer="steer" in flags)
