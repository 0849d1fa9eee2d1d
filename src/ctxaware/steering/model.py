"""``SteeredModel``: chat with a model (greedy, left-padded batches) under attention steering.

``SteeredModel(model, tokenizer, config)`` renders conversations with :func:`ctxaware.chat.render`
(the role spans come from rendering), left-pads a batch, and runs ``model.generate`` inside
:func:`ctxaware.steering.steer` with one emphasis row per example, so every prompt is steered
toward its own user turn(s) — at prefill and at every KV-cache decoding step. With ``config=None``
or ``alpha == 1`` it is plain generation through the very same code path.

Decoding is greedy whatever the model's ``generation_config`` says (sampling, temperature,
repetition penalty ... are reset to neutral values); explicit keyword arguments still win.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch

from ..errors import InputError
from .config import SteeringConfig
from ..attention.backend import model_dims
from .context import steer

logger = logging.getLogger(__name__)

# Values that make ``generate`` plain greedy decoding, overriding a model's generation_config.
_NEUTRAL = dict(do_sample=False, num_beams=1, num_return_sequences=1, temperature=1.0, top_k=50, top_p=1.0,
                typical_p=1.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                encoder_no_repeat_ngram_size=0, length_penalty=1.0, min_length=0, epsilon_cutoff=0.0,
                eta_cutoff=0.0)


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [int(v) for v in (x if isinstance(x, (list, tuple, set)) else [x])]


def greedy_generation_config(model: Any, tokenizer: Any, max_new_tokens: int, eos_token_id: Any = None,
                             pad_token_id: Any = None, **overrides: Any) -> Any:
    """A plain greedy ``GenerationConfig`` whatever the model's own says (explicit overrides win).

    Stops at ``eos_token_id`` if given, else at the model's and the tokenizer's end tokens; raises
    :class:`InputError` when there is none.
    """
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    eos = _as_list(eos_token_id)
    if not eos:
        eos = _as_list(getattr(base, "eos_token_id", None))
        eos += [t for t in _as_list(tokenizer.eos_token_id) if t not in eos]
    if not eos:
        raise InputError("no end-of-sequence token: the tokenizer and the generation config have none; "
                         "pass eos_token_id=...")
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = eos[0]
    values = dict(_NEUTRAL, max_new_tokens=int(max_new_tokens), eos_token_id=eos if len(eos) > 1 else eos[0],
                  pad_token_id=int(pad), bos_token_id=getattr(base, "bos_token_id", None))
    values.update(overrides)
    return GenerationConfig(**values)


class SteeredModel:
    """A causal LM plus its tokenizer that answers chats, optionally with attention steering.

    ``config``: a :class:`SteeringConfig` (``None`` = no steering). Its heads are checked against
    the model here, so a bad selection fails before any generation. ``chat_template`` /
    ``template_kwargs`` go to :func:`ctxaware.chat.render`.
    """

    def __init__(self, model: Any, tokenizer: Any, config: SteeringConfig | None = None, *,
                 chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None) -> None:
        if config is not None and not isinstance(config, SteeringConfig):
            if isinstance(config, dict):
                config = SteeringConfig.from_dict(config)
            else:
                raise InputError(f"config must be a SteeringConfig, a dict or None, got {type(config).__name__}")
        if config is not None:
            config.resolve_heads(*model_dims(model))
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.chat_template, self.template_kwargs = chat_template, dict(template_kwargs or {})

    @property
    def steering_active(self) -> bool:
        return self.config is not None and self.config.active

    def __repr__(self) -> str:
        return f"SteeredModel({type(self.model).__name__}, config={self.config!r})"

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Any) -> Any:
        """Render one conversation as a prompt: a new assistant turn is opened, or, when the last
        message is from the assistant, that message is continued (a response prefix).
        A plain string is one user message."""
        from ..chat import render, validate_messages

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        msgs = validate_messages(messages)
        prefix = msgs[-1]["role"] == "assistant"
        return render(self.tokenizer, msgs, add_generation_prompt=not prefix, continue_final_message=prefix,
                      chat_template=self.chat_template, template_kwargs=self.template_kwargs)

    @contextlib.contextmanager
    def steering(self, rendered: Any) -> Iterator[Any]:
        """``steer(model, config, rendered)`` when steering is active, else a no-op context."""
        if not self.steering_active:
            yield None
            return
        with steer(self.model, self.config, rendered) as plan:
            yield plan

    # ------------------------------------------------------------------ generation
    def chat(self, messages: Any, max_new_tokens: int = 256, **generate_kwargs: Any) -> str:
        """The model's reply to ``messages`` (HF ``[{role, content}]`` or a string), greedy."""
        return self.chat_batch([messages], max_new_tokens=max_new_tokens, **generate_kwargs)[0]

    def chat_batch(self, conversations: Sequence[Any], max_new_tokens: int = 256, *,
                   batch_size: int | None = None, **generate_kwargs: Any) -> list[str]:
        """Replies to several conversations, in order; run as left-padded batches of ``batch_size``
        (default: all at once). Each prompt is steered toward its own emphasised spans."""
        if isinstance(conversations, (str, dict)) or not isinstance(conversations, Sequence):
            raise InputError("chat_batch takes a list of conversations; use chat() for a single one")
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        rendered = [self.render(c) for c in conversations]
        if not rendered:
            return []
        size = batch_size or len(rendered)
        out: list[str] = []
        for i in range(0, len(rendered), size):
            out += self.generate_rendered(rendered[i:i + size], max_new_tokens=max_new_tokens, **generate_kwargs)
        return out

    def generation_config(self, max_new_tokens: int, eos_token_id: Any = None, pad_token_id: Any = None,
                          **overrides: Any) -> Any:
        """A greedy ``GenerationConfig`` independent of the model's own (explicit overrides win)."""
        return greedy_generation_config(self.model, self.tokenizer, max_new_tokens, eos_token_id, pad_token_id,
                                        **overrides)

    def generate_rendered(self, rendered_list: Sequence[Any], max_new_tokens: int = 256, eos_token_id: Any = None,
                          pad_token_id: Any = None, stop_strings: Sequence[str] | str | None = None,
                          **generate_kwargs: Any) -> list[str]:
        """Greedy replies to already rendered prompts (:class:`ctxaware.chat.RenderedChat`), one
        left-padded batch, steered per example. Each reply is decoded up to its first
        end-of-sequence token, cut just before the first stop string (if any), and stripped."""
        from ..chat import pad_left

        rendered_list = list(rendered_list)
        if not rendered_list:
            return []
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if any(len(r.input_ids) == 0 for r in rendered_list):
            raise InputError("cannot generate from an empty prompt")
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stops = [s for s in (stop_strings or []) if s]
        from transformers import GenerationConfig

        known = GenerationConfig().to_dict()
        overrides = {k: generate_kwargs.pop(k) for k in list(generate_kwargs) if k in known}
        if stops:
            overrides["stop_strings"] = stops
        gen_cfg = self.generation_config(max_new_tokens, eos_token_id, pad_token_id, **overrides)
        ids, mask, _ = pad_left(rendered_list, int(gen_cfg.pad_token_id))
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        input_ids, attention_mask = ids.to(device), mask.to(device)
        extra = {"tokenizer": self.tokenizer} if stops else {}
        with self.steering(rendered_list), torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      generation_config=gen_cfg, **extra, **generate_kwargs)
        if not isinstance(out, torch.Tensor):  # return_dict_in_generate=True
            out = out.sequences
        eos = set(_as_list(gen_cfg.eos_token_id))
        replies = []
        for row in out[:, input_ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            text = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
            for s in stops:
                pos = text.find(s)
                if pos >= 0:
                    text = text[:pos]
            replies.append(text.strip())
        return replies
