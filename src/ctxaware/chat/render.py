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
5. Straddling tokens: when the tokenizer merges a content's last (or first) characters with
   template characters into one token — ``.<`` when ``<|eot_id|>`` is plain text to it, as with the
   Zephyr template on most non-Llama tokenizers — that token belongs to the **template**, is left
   out of the span and is listed in :attr:`RenderedChat.straddling`. A token whose only characters
   outside the content are whitespace (a separator space merged into the first word) stays content.
   The content's exact text is always ``text[char_start:char_end]`` of its span.

Cost: ``n_messages + 1`` template renders and one tokenisation per conversation.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import InputError, InputFileNotFoundError, TemplateError
from .roles import from_sharegpt, to_messages  # noqa: F401  (from_sharegpt re-exported)
from .types import MESSAGE_ROLES, RenderedChat, RoleSpan

# Private-use code points: never produced by a template, vanishingly rare in data.
_SENTINELS = ("\ue000\ue001\ue002", "\ue003\ue004\ue005")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a conversation (HF ``messages``, ShareGPT turns, or an object holding either) and return
    plain ``{role, content}`` copies; the one validation path of :mod:`ctxaware.chat.roles`.

    Raises :class:`~ctxaware.chat.roles.MessageError` (an :class:`InputError`) naming the bad message
    and field.
    """
    return to_messages(messages)


MAX_MESSAGES_FILE_BYTES = 64 * 1024 * 1024


def load_messages(path: str | Path) -> list[dict[str, str]]:
    """Read one conversation from a file and validate it.

    ``.json``: a list of messages, ``{"messages": [...]}`` or ShareGPT ``{"conversations": [...]}``.
    ``.jsonl``: one message per line (or a single line holding one of the JSON shapes). A UTF-8 BOM
    is accepted; invalid UTF-8, invalid JSON, bad messages and files over 64 MiB raise
    :class:`InputError` naming the file, line/message and field.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileNotFoundError(f"messages file not found: {path}")
    size = p.stat().st_size
    if size > MAX_MESSAGES_FILE_BYTES:
        raise InputError(f"{path} is {size / 2**20:.0f} MiB, too large for one conversation (limit 64 MiB); "
                         "score datasets with 'ctxaware score' instead")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputError(f"{path}: invalid UTF-8 at byte {exc.start} (line {line}); re-save the file as UTF-8"
                         ) from None
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: not valid JSON ({exc.msg}); one message object per line") from None
        data: Any = items[0] if len(items) == 1 and isinstance(items[0], (list, Mapping)) and (
            isinstance(items[0], list) or "messages" in items[0] or "conversations" in items[0]) else items
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        return to_messages(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


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
        sentinel = next((s for s in _SENTINELS if s not in content and s not in text), None)
        if sentinel is None:
            raise InputError(f"message {i} ({m['role']}) contains both private-use marker sequences "
                             f"{_SENTINELS[0]!r} and {_SENTINELS[1]!r} that span finding relies on; remove them")
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


def _straddles(text: str, offset: tuple[int, int], c0: int, c1: int) -> bool:
    """Whether a token at character ``offset`` mixes content ``[c0, c1)`` with non-whitespace
    characters outside it (the straddling tokens of the policy in :func:`render`)."""
    a, b = offset
    outside = text[a:min(b, c0)] + text[max(a, c1):b]
    return a < c1 and b > c0 and bool(outside.strip())


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
    straddling: list[int] = []
    floor = 0
    # In text order (a template may place a message elsewhere, e.g. Mistral's system prompt in the
    # last user turn). Straddling policy: a token that mixes a content's characters with
    # non-whitespace characters outside it (``.<`` when ``<|eot_id|>`` is plain text to this
    # tokenizer) belongs to the template and is listed in ``straddling``; a token whose only outside
    # characters are whitespace (the separator space merged into the first word) stays content.
    for i in sorted(range(len(msgs)), key=lambda k: char_spans[k]):
        c0, c1 = char_spans[i]
        start = max(floor, bisect.bisect_right(ends, c0))
        end = max(start, bisect.bisect_left(starts, c1)) if c1 > c0 else start
        while start < end and offsets[start][1] <= offsets[start][0]:  # zero-width edge tokens
            start += 1
        while end > start and offsets[end - 1][1] <= offsets[end - 1][0]:
            end -= 1
        if start < end and _straddles(text, offsets[start], c0, c1):
            straddling.append(start)
            start += 1
        if start < end and _straddles(text, offsets[end - 1], c0, c1):
            straddling.append(end - 1)
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
    return RenderedChat(text=text, input_ids=ids, roles=roles, spans=spans, offsets=offsets, messages=msgs,
                        straddling=sorted(set(straddling)))


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
