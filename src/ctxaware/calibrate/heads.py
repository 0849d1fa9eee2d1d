"""Retrieval-head scores from attention (METHOD "Calibration rules") and the candidate head sets.

``r(ℓ, h) = Σ_{j ∈ needle} p_{ℓ,h}(q, j)`` for the query ``q`` that predicts the first answer token
(the last prompt token), averaged over held-in NIH prompts. It comes from one forward pass per
prompt through :func:`ctxaware.measure.observe_mass` (the needle's indicator as the only key
channel; no ``T × T`` matrix), against PASTA's one generation per prompt *and per head*.
Candidate sets: ``topK`` (the K best heads overall), ``layerK`` (the K best of every layer) and
``all``; each becomes a head spec of :class:`~ctxaware.steering.SteeringConfig`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..attention.backend import model_dims
from ..chat.types import RenderedChat
from ..errors import InputError
from ..measure import observe_mass
from .config import parse_head_set


def needle_positions(rendered: RenderedChat, needle_text: str | Sequence[str]) -> list[int]:
    """Token positions of ``needle_text`` inside the (single) user span of a rendered NIH prompt; for a
    sequence of texts (the needles of a multi-needle task) the union of their positions, ascending."""
    if not isinstance(needle_text, str):
        return sorted({p for text in needle_text for p in needle_positions(rendered, text)})
    needle_text = needle_text.strip()
    users = [s for s in rendered.spans if s.role == "user"]
    for span in users:
        at = rendered.text.find(needle_text, span.char_start, span.char_end)
        if at < 0:
            continue
        lo, hi = at, at + len(needle_text)
        pos = [i for i in range(span.start, span.end)
               if i < len(rendered.offsets) and rendered.offsets[i][0] < hi and rendered.offsets[i][1] > lo]
        if pos:
            return pos
    raise InputError(f"needle {needle_text[:40]!r}... not found in the user turn of the prompt "
                     "(was it placed in this context?)")


def retrieval_scores(model: Any, prompts: Sequence[tuple[RenderedChat, str | Sequence[str]]], *,
                     progress: bool = False) -> torch.Tensor:
    """``(layers, heads)`` float64: attention of the last prompt token on the needle, averaged over prompts.

    ``prompts``: ``(rendered prompt, needle text or texts)`` pairs (every needle of a multi-needle task
    counts, its distractors do not). One forward pass per prompt.
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise InputError("retrieval_scores needs at least one prompt")
    n_layers, n_heads = model_dims(model)
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for rendered, needle in tqdm(prompts, desc="head scores", unit="prompt", disable=not progress):
        ids = torch.tensor([rendered.input_ids], dtype=torch.long)
        chan = torch.zeros(1, ids.shape[1], 1, dtype=torch.float32)
        chan[0, needle_positions(rendered, needle), 0] = 1.0
        queries = torch.tensor([[ids.shape[1] - 1]], dtype=torch.long)
        mass = observe_mass(model, ids, None, queries, chan, layers=range(n_layers))
        total += torch.stack([mass[x][0, :, 0, 0].double().cpu() for x in range(n_layers)])
    return total / len(prompts)


def rank_heads(scores: torch.Tensor) -> list[tuple[int, int]]:
    """All ``(layer, head)`` pairs, best score first (ties: lower layer, then lower head)."""
    n_layers, n_heads = scores.shape
    pairs = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    return sorted(pairs, key=lambda p: (-float(scores[p]), p))


def head_set(scores: torch.Tensor, name: str) -> dict[int, list[int]] | str:
    """The head spec of candidate set ``name`` (``"all"``, or ``{layer: [heads]}`` for ``topK``/``layerK``)."""
    kind, k = parse_head_set(name)
    n_layers, n_heads = scores.shape
    if kind == "all":
        return "all"
    chosen: dict[int, list[int]] = {}
    if kind == "top":
        for layer, head in rank_heads(scores)[:min(k, n_layers * n_heads)]:
            chosen.setdefault(layer, []).append(head)
    else:
        for layer in range(n_layers):
            order = sorted(range(n_heads), key=lambda h: (-float(scores[layer, h]), h))
            chosen[layer] = order[:min(k, n_heads)]
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def heads_to_spec(heads: dict[int, list[int]] | str) -> str:
    """``{3: [0, 5], 7: [1]}`` -> ``"3:0,5;7:1"`` (the ``--heads`` syntax); ``"all"`` stays."""
    if isinstance(heads, str):
        return heads
    return ";".join(f"{layer}:{','.join(str(h) for h in hs)}" for layer, hs in sorted(heads.items()))


def count_heads(heads: dict[int, list[int]] | str, n_layers: int, n_heads: int) -> int:
    return n_layers * n_heads if isinstance(heads, str) else sum(len(v) for v in heads.values())
