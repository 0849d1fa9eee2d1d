"""Attention allocation by role on the study's own NIH prompts, with and without the chat template.

The paper's Fig. 3: for the query that predicts the first answer token (the last token of the
response prefix), the share of its attention on the first token (BOS / attention sink), the system
message, the user turn, the template tokens and the assistant's prefix — per layer (averaged over
heads and prompts), per head (``head_user_shares``: the user turn's share of every layer's every head,
mean over prompts, for the test across heads in the report) and on the *retrieval head*, the head with
the highest attention mass on the needle's tokens (every needle of a multi-needle task; not its
distractors) under the template.
Masses come from :func:`ctxaware.measure.observe_mass` (one value channel per key set, no ``T × T``
matrix). The result is one JSON file, written atomically;
a rerun with the same settings reads it back instead of measuring again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..fsio import atomic_write_json

logger = logging.getLogger(__name__)

CHANNELS = ("bos", "system", "user", "template", "assistant")
CONDITIONS = {"template": "chat+prefix", "no_template": "raw+prefix"}
FILENAME = "attention.json"


def needle_tokens(rendered: Any, needle_text: str | Sequence[str]) -> list[int]:
    """Token positions of ``needle_text`` (or of every text of a sequence: the needles of a task) inside
    the user turn of ``rendered`` (by character offsets)."""
    users = [s for s in rendered.spans if s.role == "user"]
    lo = users[0].char_start if users else 0
    hi = users[0].char_end if users else len(rendered.text)
    out: set[int] = set()
    for text in [needle_text] if isinstance(needle_text, str) else needle_text:
        start = rendered.text.find(text.strip(), lo, hi)
        if start < 0:
            raise InputError("the needle's text is not in the rendered user turn (did the chat template rewrite it?)")
        end = start + len(text.strip())
        out.update(i for i, (s, e) in enumerate(rendered.offsets) if s < end and e > start and e > s)
    return sorted(out)


def channel_matrix(rendered: Any, needle_pos: Sequence[int]) -> torch.Tensor:
    """``(T, 6)`` key weights: the five role channels (a partition of the tokens) and the needle."""
    n = len(rendered.input_ids)
    m = torch.zeros((n, len(CHANNELS) + 1), dtype=torch.float32)
    for i, role in enumerate(rendered.roles):
        m[i, CHANNELS.index("bos" if i == 0 else role)] = 1.0
    m[list(needle_pos), len(CHANNELS)] = 1.0
    return m


def measure_prompt(model: Any, rendered: Any, needle_text: str | Sequence[str]) -> torch.Tensor:
    """``(layers, heads, 6)`` attention mass of the last token on each channel (+ needle)."""
    from ..attention.backend import model_dims
    from ..measure import observe_mass

    n_layers, _ = model_dims(model)
    chan = channel_matrix(rendered, needle_tokens(rendered, needle_text))
    ids = torch.tensor([rendered.input_ids], dtype=torch.long)
    q = torch.tensor([[len(rendered.input_ids) - 1]], dtype=torch.long)
    got = observe_mass(model, ids, None, q, chan[None], layers=list(range(n_layers)))
    return torch.stack([got[x][0, :, 0, :].float().cpu() for x in range(n_layers)])  # (L, H, C)


def attention_by_role(model: Any, tokenizer: Any, haystack: Any, needle: Any, length: int, depths: Sequence[float],
                      *, reserve: int = 200, system: str = "", progress: bool = True) -> dict[str, Any]:
    """Measure every condition on one NIH prompt per depth; the JSON-ready result (see module doc)."""
    from tqdm.auto import tqdm

    from ..niah.prompts import build_prompt

    masses: dict[str, list[torch.Tensor]] = {c: [] for c in CONDITIONS}
    tokens: dict[str, list[int]] = {c: [] for c in CONDITIONS}
    jobs = [(d, c) for d in depths for c in CONDITIONS]
    for depth, cond in tqdm(jobs, desc="attention", unit="prompt", disable=not progress):
        placement = haystack.place_task(needle, length, depth, reserve=reserve)
        rendered = build_prompt(tokenizer, placement.text, needle, CONDITIONS[cond], system=system).rendered
        masses[cond].append(measure_prompt(model, rendered, needle.texts))
        tokens[cond].append(len(rendered.input_ids))
    mean = {c: torch.stack(v).mean(0) for c, v in masses.items()}  # (L, H, C)
    needle_mass = mean["template"][..., len(CHANNELS)]
    flat = int(torch.argmax(needle_mass))
    layer, head = divmod(flat, needle_mass.shape[1])
    out: dict[str, Any] = {"length": int(length), "depths": [float(d) for d in depths], "channels": list(CHANNELS),
                           "modes": dict(CONDITIONS), "query": "last token of the response prefix",
                           "retrieval_head": {"layer": layer, "head": head,
                                              "needle_mass": float(needle_mass[layer, head])},
                           "conditions": {}}
    for cond, m in mean.items():
        roles = m[..., :len(CHANNELS)].double()
        per_layer = roles.mean(dim=1)
        per_layer = per_layer / per_layer.sum(-1, keepdim=True).clamp_min(1e-30)
        rh = roles[layer, head] / roles[layer, head].sum().clamp_min(1e-30)
        per_head = roles[..., CHANNELS.index("user")] / roles.sum(-1).clamp_min(1e-30)  # (L, H), every head
        out["conditions"][cond] = {
            "head_user_shares": per_head.tolist(),
            "tokens": tokens[cond],
            "shares": {ch: per_layer[:, i].tolist() for i, ch in enumerate(CHANNELS)},
            "retrieval_head_shares": {ch: float(rh[i]) for i, ch in enumerate(CHANNELS)},
            "needle_mass": m[..., len(CHANNELS)].tolist(),
            "mean_shares": {ch: float(per_layer[:, i].mean()) for i, ch in enumerate(CHANNELS)},
        }
    return out


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically (temp file, fsync, rename)."""
    return atomic_write_json(path, data, indent=1, default=str)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or torn."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
