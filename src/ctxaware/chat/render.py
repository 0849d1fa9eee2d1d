"""Render a conversation with a chat template into token ids plus role spans.

How spans are found — by rendering, never by searching for a message's text:

1. The conversation is rendered once as it is (text ``T``).
2. For each message ``i`` it is rendered again with only that message's content replaced by a
   sentinel of private-use characters (text ``T_i``). Everything the template put before the content
   is the common prefix of ``T`` and ``T_i``, everything after it their common suffix, so the content
   occupies ``T[len(prefix) : len(T) - len(suffix)]``. This works when the template merges the system
   prompt into the first user turn (Llama-2), trims contents (Llama-3), or inserts a default system
   prompt (SmolLM2, Qwen), and when a content repeats earlier text or the system prompt.
3. The located text must equal the content (or the content with surrounding whitespace stripped).
   When the template drops a message, rewrites it, or uses it more than once, that check fails and
   a :class:`~ctxaware.errors.TemplateError` names the message — nothing is labelled silently.
4. ``T`` is tokenised once (no special tokens added: the template writes them) and each token is
   labelled with the role of the content it overlaps (character offsets), else ``template``.

Cost: ``n_messages + 1`` template renders and one tokenisation per conversation.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import InputError, InputFileNotFoundError, TemplateError
from .types import MESSAGE_ROLES, RenderedChat, RoleSpan

# Private-use code points: never produced by a template, vanishingly rare in data.
_SENTINELS = ("\ue000\ue001\ue002", "\ue003\ue004\ue005")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                   "system": "system"}


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check HF ``messages`` (a non-empty list of ``{role, content}``) and return plain dict copies.

    Raises :class:`InputError` naming the bad message: not a list, empty list, a message that is not a
    mapping, an unknown role (allowed: system, user, assistant), or non-string content.
    """
    if isinstance(messages, Mapping) and "messages" in messages:
        messages = messages["messages"]
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    if not messages:
        raise InputError("messages is empty: a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if hasattr(m, "to_dict") and not isinstance(m, Mapping):
            m = m.to_dict()
        if not isinstance(m, Mapping):
            raise InputError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in MESSAGE_ROLES:
            raise InputError(f"message {i} has unknown role {role!r}; use one of {', '.join(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def from_sharegpt(conversations: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """ShareGPT ``[{from, value}]`` -> HF ``[{role, content}]`` (human→user, gpt→assistant)."""
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn:
            raise InputError(f"ShareGPT turn {i} must be a dict with 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise InputError(f"ShareGPT turn {i} has unknown speaker {turn['from']!r}")
        out.append({"role": role, "content": turn.get("value")})
    return out


def load_messages(path: str | Path) -> list[dict[str, str]]:
    """Read one conversation from a JSON file: a list of messages, ``{"messages": [...]}``, or a
    ShareGPT ``{"conversations": [{from, value}]}``; validated."""
    p = Path(path)
    if not p.is_file():
        raise InputFileNotFoundError(f"messages file not found: {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, Mapping) and "conversations" in data and "messages" not in data:
        data = from_sharegpt(data["conversations"])
    return validate_messages(data)


def _apply(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool,
           continue_final_message: bool, chat_template: str | None, template_kwargs: Mapping[str, Any]) -> str:
    kwargs = dict(template_kwargs)
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except ValueError as exc:
        if "chat_template" in str(exc) or "chat template" in str(exc):
            raise TemplateError(f"no chat template: the tokenizer has none and none was given ({exc}); pass "
                                "chat_template=... (CLI: --template-file)") from None
        raise TemplateError(f"the chat template failed on this conversation: {exc}") from None
    except Exception as exc:  # jinja2 TemplateError (raise_exception in templates), TypeError, ...
        raise TemplateError(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") from None
    if not isinstance(text, str):  # pragma: no cover - batched call by mistake
        raise TemplateError("apply_chat_template returned no text")
    return text


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix of two strings or lists (compared in blocks, then items)."""
    n = min(len(a), len(b))
    i = 0
    step = 1024
    while i < n:  # coarse then fine
        j = min(n, i + step)
        if a[i:j] == b[i:j]:
            i = j
            continue
        while a[i] == b[i]:
            i += 1
        return i
    return n


def _common_suffix(a: str, b: str, limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[len(a) - 1 - i] == b[len(b) - 1 - i]:
        i += 1
    return i


def _locate(full: str, variant: str) -> tuple[int, int]:
    p = common_prefix(full, variant)
    s = _common_suffix(full, variant, min(len(full), len(variant)) - p)
    return p, len(full) - s


def _content_matches(found: str, content: str) -> bool:
    return found in (content, content.strip(), content.lstrip(), content.rstrip())


def _char_spans(tokenizer: Any, messages: list[dict[str, str]], text: str, render_kwargs: dict
                ) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        content = m["content"]
        sentinel = next(s for s in _SENTINELS if s not in content and s not in text)
        variant_msgs = [dict(x) for x in messages]
        variant_msgs[i]["content"] = sentinel
        variant = _apply(tokenizer, variant_msgs, **render_kwargs)
        where = f"message {i} ({m['role']})"
        if variant == text:
            raise TemplateError(f"the chat template drops the content of {where}: it does not appear in the "
                                "rendered text, so no span can be given (does the template support this role?)")
        if variant.count(sentinel) != 1:
            raise TemplateError(f"the chat template uses the content of {where} {variant.count(sentinel)} times; "
                                "role spans would be ambiguous")
        start, end = _locate(text, variant)
        if start > end:  # the content is a repeat of what surrounds it; the diff collapsed
            start = end = min(start, end)
        found = text[start:end]
        if not _content_matches(found, content):
            # An empty content can leave the diff on template characters around it: place it at the
            # sentinel's position instead, if the template shows nothing of it.
            if content.strip() == "" and text == variant.replace(sentinel, "", 1):
                start = end = variant.index(sentinel)
            elif content.strip() == "" and text == variant.replace(sentinel, content, 1):
                start = variant.index(sentinel)
                end = start + len(content)
            else:
                raise TemplateError(f"the chat template rewrites the content of {where}: rendered as "
                                    f"{found[:60]!r} instead of {content[:60]!r}; role spans would be wrong")
        spans.append((start, end))
    ordered = sorted(spans)
    for (a0, a1), (b0, b1) in zip(ordered, ordered[1:]):
        if b0 < a1:
            raise TemplateError("the chat template interleaves two message contents; role spans would be ambiguous")
    return spans


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; "
                            "load the fast one (use_fast=True)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def render(tokenizer: Any, messages: Any, *, add_generation_prompt: bool = False,
           continue_final_message: bool = False, chat_template: str | None = None,
           template_kwargs: Mapping[str, Any] | None = None) -> RenderedChat:
    """Render ``messages`` with ``tokenizer``'s chat template (or ``chat_template``) into ids + spans.

    ``add_generation_prompt`` appends the assistant header; ``continue_final_message`` leaves the
    final assistant message open, so generation continues it (a response prefix). ``template_kwargs``
    go to the template (e.g. ``{"enable_thinking": False}``). Raises :class:`InputError` for bad
    messages and :class:`TemplateError` when the template is missing or cannot be split reliably.
    """
    msgs = validate_messages(messages)
    if add_generation_prompt and continue_final_message:
        raise InputError("add_generation_prompt and continue_final_message are exclusive: the first opens a "
                         "new assistant turn, the second continues the last one")
    if continue_final_message and msgs[-1]["role"] != "assistant":
        raise InputError("continue_final_message needs an assistant message last (the response prefix)")
    kwargs = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                  chat_template=chat_template, template_kwargs=dict(template_kwargs or {}))
    text = _apply(tokenizer, msgs, **kwargs)
    char_spans = _char_spans(tokenizer, msgs, text, kwargs)
    ids, offsets = _offsets(tokenizer, text)
    roles = ["template"] * len(ids)
    ends = [e for _, e in offsets]
    starts = [b for b, _ in offsets]
    token_spans: dict[int, tuple[int, int]] = {}
    floor = 0
    # In text order (a template may place a message elsewhere, e.g. Mistral's system prompt in the
    # last user turn); a token straddling two contents goes to the first one.
    for i in sorted(range(len(msgs)), key=lambda k: char_spans[k]):
        c0, c1 = char_spans[i]
        start = max(floor, bisect.bisect_right(ends, c0))
        end = max(start, bisect.bisect_left(starts, c1)) if c1 > c0 else start
        while start < end and offsets[start][1] <= offsets[start][0]:  # zero-width edge tokens
            start += 1
        while end > start and offsets[end - 1][1] <= offsets[end - 1][0]:
            end -= 1
        for t in range(start, end):
            if offsets[t][1] > offsets[t][0]:
                roles[t] = msgs[i]["role"]
        token_spans[i] = (start, end)
        floor = max(floor, end)
    spans: list[RoleSpan] = []
    turns = {r: 0 for r in MESSAGE_ROLES}
    for i, m in enumerate(msgs):
        start, end = token_spans[i]
        c0, c1 = char_spans[i]
        spans.append(RoleSpan(role=m["role"], turn=turns[m["role"]], message=i, start=start, end=end,
                              char_start=c0, char_end=c1))
        turns[m["role"]] += 1
    return RenderedChat(text=text, input_ids=ids, roles=roles, spans=spans, offsets=offsets, messages=msgs)


def render_batch(tokenizer: Any, conversations: Iterable[Any], **kwargs: Any) -> list[RenderedChat]:
    """:func:`render` for each conversation (same keyword arguments)."""
    return [render(tokenizer, c, **kwargs) for c in conversations]


def pad_left(sequences: Sequence[RenderedChat | Sequence[int]], pad_id: int = 0) -> tuple[Any, Any, list[int]]:
    """Left-pad rendered chats (or id lists) into tensors: ``(input_ids, attention_mask, offsets)``,
    both ``(B, max_len)`` long tensors; ``offsets[b]`` is the pad length of row ``b``."""
    import torch

    if not sequences:
        raise InputError("nothing to pad: empty batch")
    rows = [list(s.input_ids) if isinstance(s, RenderedChat) else list(s) for s in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for b, row in enumerate(rows):
        off = width - len(row)
        offsets.append(off)
        if row:
            ids[b, off:] = torch.tensor(row, dtype=torch.long)
            mask[b, off:] = 1
    return ids, mask, offsets
