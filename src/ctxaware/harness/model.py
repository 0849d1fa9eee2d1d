"""``CtxawareLM``: lm-eval's HF model class with ctxaware rendering and attention steering.

Registered with lm-eval as ``ctxaware`` when this module is imported. It subclasses
:class:`lm_eval.models.huggingface.HFLM` and keeps its batching, stopping and decoding; it changes
only how a request's prompt becomes token ids, and wraps the model calls in :func:`steer`:

- Every request is rendered with :func:`ctxaware.chat.render` (chat template) or
  :func:`ctxaware.measure.render_plain` (no template), so the role of every prompt token is known.
  The chat template is used when the doc asks for it (``ctxaware_chat_template``, set by the shipped
  tasks: true for ``_ind``/``_no_ind``, false for ``_no_template``); for other tasks it follows
  lm-eval's run-level ``apply_chat_template``. ``chat_template=True/False`` forces it for every request.
- ``_model_generate`` and ``_model_call`` run inside ``steer(model, config, emphasis)`` with the
  per-row emphasis of the (left-padded or right-padded) batch; ``alpha=1`` (default) never steers.
- A loglikelihood row whose context lm-eval left-truncated to fit ``max_length`` is steered with the
  emphasis of the surviving tokens; a row that matches no rendered request raises
  :class:`~ctxaware.errors.SteeringError` rather than running unsteered.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import ConfigError, SteeringError, TemplateError
from ..steering.config import SteeringConfig
from .qa import TEMPLATE_FIELD

logger = logging.getLogger(__name__)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_template_mode(value: Any) -> bool | None:
    """``None``/"task"/"auto" -> None (per task); booleans and on/off strings -> bool."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("task", "auto", "none", ""):
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"chat_template must be 'task', true or false, got {value!r}")


def resolve_device(device: Any) -> str:
    """The torch device to load on: as asked, cuda when available by default, and cpu (with a warning)
    when a CUDA device is asked for without CUDA — lm-eval's CLI asks for ``cuda:0`` unless told."""
    if device in (None, ""):
        from ..models import default_device

        return default_device()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available; using cpu", device)
        return "cpu"
    return str(device)


def _heads(value: Any) -> Any:
    """lm-eval's arg parser turns ``heads=3`` into an int: back to the spec string."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


@register_model("ctxaware")
class CtxawareLM(HFLM):
    """HFLM + per-request chat rendering + attention steering (see module doc)."""

    def __init__(
        self,
        pretrained: Any = None,
        tokenizer: Any = None,
        *,
        alpha: float = 1.0,
        heads: Any = "all",
        emphasis: str = "user",
        compounding: str = "none",
        rule: str = "alpha",
        share: float = 0.5,
        steering: SteeringConfig | None = None,
        chat_template: Any = None,
        dtype: str = "auto",
        device: str | None = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        from ..models import load_model, load_tokenizer

        # the whole steering (a steering file's, or these fields): rule and share included
        self.steering = steering if steering is not None else SteeringConfig(
            alpha=alpha, heads=_heads(heads), emphasis=str(emphasis), compounding=str(compounding), rule=str(rule),
            share=float(share))
        self.chat_template_mode = parse_template_mode(chat_template)
        if pretrained is None or isinstance(pretrained, (str, os.PathLike)):
            device = None if device_map not in (None, "") else resolve_device(device)
            loaded = load_model(None if pretrained in (None, "") else str(pretrained), dtype=dtype, device=device,
                                device_map=device_map or None, attn_implementation=attn_implementation or None,
                                trust_remote_code=trust_remote_code)
            model, tok, self.model_name = loaded.model, loaded.tokenizer, loaded.name
        else:
            if tokenizer is None:
                raise ConfigError("pass tokenizer= together with an already loaded model as pretrained=")
            model, tok = pretrained, None
            self.model_name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
        if tokenizer is not None:
            tok = load_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        super().__init__(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size, **kwargs)
        self._templated: dict[str, tuple[list[dict], bool]] = {}  # lm-eval's chat-templated text -> messages
        self._rendered: dict[str, Any] = {}  # final prompt text -> RenderedChat (during one call)
        # loglikelihood: the context ids the model sees (after lm-eval's left truncation) ->
        # (RenderedChat, number of its tokens truncated away)
        self._ll_chats: dict[tuple[int, ...], tuple[Any, int]] = {}
        self._batch_emphasis: torch.Tensor | None = None

    # ---------------------------------------------------------------- rendering
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = super().apply_chat_template(chat_history, add_generation_prompt)
        self._templated[text] = ([dict(m) for m in chat_history], add_generation_prompt)
        return text

    def use_template(self, doc: Any, templated: bool) -> bool:
        """Whether a request is rendered with the chat template (see module doc)."""
        if self.chat_template_mode is not None:
            return self.chat_template_mode
        flag = doc.get(TEMPLATE_FIELD) if isinstance(doc, dict) else None
        return bool(flag) if flag is not None else templated

    def render_request(self, context: str, doc: Any = None) -> Any:
        """The RenderedChat of one request's context (ids the model sees, roles of its tokens)."""
        from ..chat import render
        from ..measure import render_plain

        entry = self._templated.get(context)
        messages, add_gen = entry if entry is not None else ([{"role": "user", "content": context}], True)
        if not self.use_template(doc, entry is not None):
            return render_plain(self.tokenizer, messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError(f"{self.model_name} has no chat template; use the _no_template tasks "
                                "or chat_template=false")
        return render(self.tokenizer, messages, add_generation_prompt=add_gen,
                      continue_final_message=not add_gen, template_kwargs=self.chat_template_args or None)

    def _prepare(self, requests: list[Any]) -> list[Any]:
        """Render every request; its context becomes the rendered text (so logged samples show the
        exact prompt), and the RenderedChat is kept for tokenisation and emphasis."""
        done: set[int] = set()
        for req in requests:
            context, *rest = req.args
            if not context or id(req) in done:  # empty, or a repeat of a request already rendered
                continue
            done.add(id(req))
            chat = self.render_request(context, req.doc)
            self._rendered[chat.text] = chat
            req.arguments = (chat.text, *rest)
        return requests

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        chat = self._rendered.get(string)
        if chat is None:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        ids = list(chat.input_ids)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                         left_truncate_len: int | None = None, truncation: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        chats = [self._rendered.get(s) for s in strings]
        self._batch_emphasis = None
        if not strings or padding_side != "left" or any(c is None for c in chats):
            return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
        width = max(len(c.input_ids) for c in chats)
        ids = torch.full((len(chats), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chats), width), dtype=torch.long)
        for i, c in enumerate(chats):
            n = len(c.input_ids)
            ids[i, width - n:] = torch.tensor(c.input_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        emphasis = self._emphasis_of(chats) if self.steering.active else None
        if left_truncate_len and width > left_truncate_len:
            logger.warning("prompt of %d tokens left-truncated to %d", width, left_truncate_len)
            ids, mask = ids[:, -left_truncate_len:], mask[:, -left_truncate_len:]
            emphasis = emphasis[:, -left_truncate_len:] if emphasis is not None else None
        self._batch_emphasis = emphasis
        return ids, mask

    def _emphasis_of(self, chats: list[Any]) -> torch.Tensor:
        """Bool (B, max_len) emphasis of left-padded rendered prompts, per the steering config."""
        from ..steering.context import emphasis_mask

        return emphasis_mask(chats, self.steering.emphasis_roles)

    # ---------------------------------------------------------------- requests
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        try:
            return super().generate_until(self._prepare(requests), disable_tqdm=disable_tqdm)
        finally:
            self._rendered.clear()
            self._batch_emphasis = None

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        try:
            return super().loglikelihood(self._prepare(requests), disable_tqdm=disable_tqdm)
        finally:
            self._rendered.clear()
            self._ll_chats.clear()

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        chat = self._rendered.get(context)
        if chat is None:
            return super()._encode_pair(context, continuation)
        context_enc = list(chat.input_ids)
        continuation_enc = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if self.steering.active:
            # HFLM feeds (context + continuation)[-(max_length + 1):][:-1]: when that cuts the context
            # from the left, key the row by the surviving part and steer with its emphasis.
            cut = max(0, len(context_enc) + len(continuation_enc) - (self.max_length + 1))
            if cut >= len(context_enc):
                raise SteeringError(f"a loglikelihood request's continuation ({len(continuation_enc)} tokens) fills "
                                    f"the model's window ({self.max_length}): no context token is left to steer; "
                                    "use a model with a longer window or a task with shorter answers")
            if cut:
                logger.warning("loglikelihood context left-truncated by %d tokens to fit %d: steering the "
                               "surviving %d tokens", cut, self.max_length, len(context_enc) - cut)
            self._ll_chats[tuple(context_enc[cut:])] = (chat, cut)
        return context_enc, list(continuation_enc)

    # ---------------------------------------------------------------- model calls
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        emphasis, self._batch_emphasis = self._batch_emphasis, None
        if not self.steering.active:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        if emphasis is None or tuple(emphasis.shape) != tuple(context.shape):
            raise SteeringError("steered generation needs prompts rendered by CtxawareLM.generate_until")
        from ..steering import steer

        with steer(self.model, self.steering, emphasis=emphasis.to(context.device)):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _call_emphasis(self, inps: torch.Tensor) -> torch.Tensor | None:
        """Per-row emphasis of a right-padded loglikelihood batch (of the part of the context that
        survived lm-eval's left truncation); None when no row is known. A row of a rendered request
        that cannot be matched raises instead of running unsteered."""
        if not self._ll_chats:
            return None
        lengths = sorted({len(k) for k in self._ll_chats}, reverse=True)
        rows, width = inps.tolist(), inps.shape[1]
        out = torch.ones(inps.shape, dtype=torch.bool)
        found = 0
        for i, row in enumerate(rows):
            for n in lengths:
                hit = self._ll_chats.get(tuple(row[:n])) if n <= width else None
                if hit is not None:
                    chat, cut = hit
                    out[i, :n] = self._emphasis_of([chat])[0][cut:cut + n]
                    found += 1
                    break
        if found and found < len(rows):
            raise SteeringError(f"{len(rows) - found} of {len(rows)} rows of a loglikelihood batch match no "
                                "rendered request, so they would run unsteered; use batch_size=1 or report this")
        return out if found else None

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        emphasis = self._call_emphasis(inps) if self.steering.active else None
        if emphasis is None:
            return super()._model_call(inps, attn_mask, labels)
        from ..steering import steer

        with steer(self.model, self.steering, emphasis=emphasis.to(inps.device)):
            return super()._model_call(inps, attn_mask, labels)

    def get_model_info(self) -> dict:
        """Model facts for the results JSON (no hub look-ups)."""
        return {"model_name": self.model_name,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype),
                "steering": self.steering.to_dict(),
                "chat_template": "task" if self.chat_template_mode is None else self.chat_template_mode}
