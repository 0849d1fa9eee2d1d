"""Training data: conversations rendered with the chat template, labels from ``ctxaware.chat`` role spans.

Supervised tokens (``loss: assistant``), for every assistant turn: its content tokens, plus the
template tokens that follow the content (before the next content span) up to and including the
first end-of-turn token — a special token of the tokenizer or an EOS id of the model's configs
(``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>`` ...). These are the same
positions that scoring uses as a response's queries (:mod:`ctxaware.measure.positions`). So the
model learns to stop; the role header of the turn and everything after the end-of-turn token (newlines,
the next turn's markers) are not supervised. Role markers are found from the spans, so this works
with any template — no ``{% generation %}`` markers needed. ``loss: full`` supervises every token,
as the reference did. Labels are ``-100`` on unsupervised tokens (the convention of transformers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError, InputFileNotFoundError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TrainingData:
    """Tokenised training data (``dataset`` has ``input_ids`` and ``labels`` columns) and its counts."""

    dataset: Any
    num_examples: int
    num_tokens: int
    num_supervised: int
    num_truncated: int
    num_dropped: int

    def summary(self) -> str:
        frac = self.num_supervised / max(self.num_tokens, 1)
        return (f"{self.num_examples} conversations, {self.num_tokens} tokens, {self.num_supervised} supervised "
                f"({frac:.0%}), {self.num_truncated} truncated, {self.num_dropped} dropped")


def load_conversations(path: str | Path, *, max_examples: int | None = None) -> list[list[dict[str, Any]]]:
    """The conversations (lists of messages) of a dataset file or name (read by ``ctxaware.scoring``)."""
    from ..scoring import load_conversations as load_rows

    rows = load_rows(path)
    rows = rows[:max_examples] if max_examples else rows
    return [row["messages"] for row in rows]


def end_of_turn_ids(tokenizer, model=None) -> set[int]:
    """Token ids that can close a turn (the tokenizer's special tokens and every configured EOS id)."""
    from ..measure.positions import end_token_ids

    return end_token_ids(model, tokenizer)


def assistant_labels(rendered, stop_ids: set[int]) -> list[int]:
    """Labels supervising each assistant turn's content and its end-of-turn token (see module doc).

    The supervised positions of a turn are exactly the *response* positions that scoring uses as
    queries (:func:`ctxaware.measure.positions.response_positions`).
    """
    from ..measure.positions import response_positions

    ids = rendered.input_ids
    labels = [IGNORE_INDEX] * len(ids)
    for span in rendered.spans_of("assistant"):
        for pos in response_positions(rendered, span, stop_ids):
            labels[pos] = ids[pos]
    return labels


def tokenize_conversation(tokenizer, messages: list[dict[str, Any]], *, loss: str = "assistant",
                          stop_ids: set[int] | None = None, chat_template: str | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one conversation (not truncated)."""
    from ..chat import render

    rendered = render(tokenizer, messages, chat_template=chat_template)
    ids = list(rendered.input_ids)
    if loss == "full":
        labels = list(ids)
    else:
        labels = assistant_labels(rendered, stop_ids if stop_ids is not None else end_of_turn_ids(tokenizer))
    return {"input_ids": ids, "labels": labels}


def build_dataset(tokenizer, conversations: Iterable[list[dict[str, Any]]], *, loss: str = "assistant",
                  max_length: int = 2048, stop_ids: set[int] | None = None, chat_template: str | None = None,
                  drop_unsupervised: bool = False, progress: bool = True) -> TrainingData:
    """Tokenise, label and truncate conversations into a ``datasets.Dataset`` ready for TRL.

    Refuses (``InputError``) when a conversation is left with no supervised token — usually a
    prompt longer than ``max_length``, or no assistant turn — unless ``drop_unsupervised``.
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    from ..errors import TemplateError

    if stop_ids is None:
        stop_ids = end_of_turn_ids(tokenizer)
    conversations = list(conversations)
    input_ids, labels, empty = [], [], []
    truncated = tokens = supervised = 0
    for i, messages in enumerate(tqdm(conversations, desc="tokenising", disable=not progress, unit="conv")):
        try:
            row = tokenize_conversation(tokenizer, messages, loss=loss, stop_ids=stop_ids, chat_template=chat_template)
        except (InputError, TemplateError) as exc:
            raise type(exc)(f"conversation {i}: {exc}") from exc
        if len(row["input_ids"]) > max_length:
            truncated += 1
            row = {k: v[:max_length] for k, v in row.items()}
        n_sup = sum(lab != IGNORE_INDEX for lab in row["labels"][1:])  # the first label is never predicted
        if n_sup == 0:
            empty.append(i)
            continue
        input_ids.append(row["input_ids"])
        labels.append(row["labels"])
        tokens += len(row["input_ids"])
        supervised += n_sup
    if empty and not drop_unsupervised:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise InputError(f"{len(empty)} conversation(s) have no supervised token after truncation to "
                         f"{max_length} tokens (no assistant turn, or the prompt fills max_length): {shown}; "
                         "raise max_length, fix the data, or set drop_unsupervised: true")
    if empty:
        logger.warning("dropped %d conversation(s) with no supervised token", len(empty))
    if not input_ids:
        raise InputError("no conversation left to train on")
    dataset = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    return TrainingData(dataset, len(input_ids), tokens, supervised, truncated, len(empty))


# The Zephyr / TinyLlama-chat template the paper's recipes use, with the generation prompt ending in
# the same newline that training renders after <|assistant|> (the original omits it, so a prompt
# rendered for generation would not be a prefix of the training text).
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"zephyr": ZEPHYR_TEMPLATE}


def resolve_chat_template(value: str | None) -> str | None:
    """A template name (``zephyr``), a ``.jinja`` file, or a literal Jinja template, as template text."""
    if value is None or value == "":
        return None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputFileNotFoundError(f"chat template {value!r} is neither a known name "
                                     f"({', '.join(NAMED_TEMPLATES)}) nor a file")
    return path.read_text(encoding="utf-8")
