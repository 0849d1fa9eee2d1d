"""Running an NIH study: grid of cells → prompts → greedy answers (± steering) → scored JSONL.

Speed, on CPU as on GPU: the haystack is read and tokenised once; cells are rendered up front and,
with batch size 1 (the default), generated in lexicographic order of their token ids while the KV
cache of the prompt prefix shared with the previous cell is kept (the cache is cropped to the
common prefix). Cells of one length share the haystack before the needle, and every cell shares
the template and instruction, so this order prefills each distinct prefix only once. With
``batch_size > 1`` cells of one mode are generated in left-padded batches of similar length
instead, through :meth:`ctxaware.steering.SteeredModel.generate_rendered`.
Decoding is greedy whatever the model's generation config says.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import NiahConfig, parse_mode
from .haystack import Haystack, read_haystack
from .needles import Needle, load_needle
from .prompts import Prompt, build_prompt
from .results import ResultStore, cell_key, write_summary
from .scoring import format_table, recall

logger = logging.getLogger(__name__)


@dataclass
class Cell:
    """One grid cell: mode × length × depth, with its rendered prompt once built."""

    mode: str
    length: int
    depth: float
    key: str = ""
    prompt: Prompt | None = None
    placement: Any = None


@dataclass
class NiahRun:
    """What :func:`run_niah` returns: all records of the study, the summary, and the files written."""

    out: Path
    records: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    plots: list[Path] = field(default_factory=list)
    new_cells: int = 0

    def table(self) -> str:
        return format_table(self.summary)


def greedy_kwargs(model: Any, tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    """``generate`` arguments for plain greedy decoding, overriding any sampling in the model's config."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None) if base is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if isinstance(eos, int) else eos[0])
    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad, bos_token_id=getattr(base, "bos_token_id", None))
    return {"generation_config": cfg}


def steering_config(config: NiahConfig):
    from ..steering import SteeringConfig

    return SteeringConfig(alpha=float(config.alpha), heads=config.heads)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CachedGenerator:
    """Greedy generation one prompt at a time, reusing the KV cache of the shared prompt prefix."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, *, reuse: bool = True) -> None:
        self.model, self.tokenizer, self.reuse = model, tokenizer, reuse
        self.kwargs = greedy_kwargs(model, tokenizer, max_new_tokens)
        self.cache = None
        self.cached_ids: list[int] = []
        self.steer_key: Any = None

    def generate(self, rendered: Any, steer_cfg: Any = None) -> str:
        import torch
        from transformers import DynamicCache

        ids = list(rendered.input_ids)
        key = None if steer_cfg is None else repr(steer_cfg.to_dict())
        if self.cache is None or not self.reuse or key != self.steer_key:
            self.cache, self.cached_ids = DynamicCache(config=self.model.config), []
        keep = min(_common_prefix(self.cached_ids, ids), len(ids) - 1, self.cache.get_seq_length())
        if self.cache.get_seq_length() > keep:
            self.cache.crop(keep - self.cache.get_seq_length())
        self.steer_key = key
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        ctx = contextlib.nullcontext()
        if steer_cfg is not None:
            from ..steering import steer

            ctx = steer(self.model, steer_cfg, rendered)
        with ctx, torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      past_key_values=self.cache, **self.kwargs)
        seq = out[0].tolist()
        self.cached_ids = seq[: self.cache.get_seq_length()]
        return self.tokenizer.decode(seq[len(ids):], skip_special_tokens=True).strip()


def _record(cfg: NiahConfig, model_name: str, needle: Needle, haystack_id: str, cell: Cell, answer: str,
            seconds: float) -> dict[str, Any]:
    r = cell.prompt.rendered
    rec = {
        "key": cell.key, "model": model_name, "mode": cell.mode, "needle": needle.name, "haystack": haystack_id,
        "length": cell.length, "tokens": r.prompt_len, "depth": cell.depth,
        "needle_token": cell.placement.needle_token_index, "haystack_tokens": cell.placement.haystack_tokens,
        "prompt_sha256": hashlib.sha256(r.text.encode("utf-8")).hexdigest(),
        "answer": answer, "recall": recall(answer, needle.keywords), "seconds": round(seconds, 3),
    }
    if cell.prompt.prefix:
        rec["prefix"] = cell.prompt.prefix
    if cell.prompt.steer:
        rec["alpha"], rec["heads"] = float(cfg.alpha), cfg.heads
    return rec


def plan_cells(cfg: NiahConfig, model_name: str, needle: Needle, haystack_id: str) -> list[Cell]:
    """All cells of the grid (length-major, then depth, then mode), with their resume keys."""
    cells = []
    for length in cfg.grid_lengths():
        for depth in cfg.grid_depths():
            for mode in cfg.modes:
                key = cell_key(model=model_name, mode=mode, needle=needle.name, length=length, depth=depth,
                               haystack=haystack_id, alpha=cfg.alpha, heads=cfg.heads)
                cells.append(Cell(mode, length, depth, key))
    return cells


def _batches(cells: list[Cell], size: int) -> list[list[Cell]]:
    by_mode: dict[str, list[Cell]] = {}
    for c in sorted(cells, key=lambda c: (c.length, c.prompt.rendered.prompt_len)):
        by_mode.setdefault(c.mode, []).append(c)
    return [group[i:i + size] for group in by_mode.values() for i in range(0, len(group), size)]


def run_niah(config: NiahConfig | None = None, *, model: Any = None, tokenizer: Any = None,
             model_name: str | None = None, plot: bool = True) -> NiahRun:
    """Run (or resume) the study of ``config``; returns all records and the per-mode summary.

    ``model``/``tokenizer`` may be given to reuse a loaded model (``model_name`` then names it in
    the records; default ``config.model``).
    """
    cfg = config or NiahConfig()
    needle = load_needle(cfg.needle)
    hay_text = read_haystack(cfg.haystack)
    study = {**cfg.study_dict(), "needle_definition": needle.to_dict(), "haystack_id": hay_text.id}
    store = ResultStore(cfg.out, study, overwrite=cfg.overwrite)
    if model is None or tokenizer is None:
        from ..models import load_model

        loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        model, tokenizer, model_name = loaded.model, loaded.tokenizer, model_name or loaded.name
    model_name = model_name or cfg.model
    hay = Haystack(hay_text, tokenizer)
    hay.token_ids(max(cfg.grid_lengths()))
    cells = plan_cells(cfg, model_name, needle, hay.id)
    todo = [c for c in cells if c.key not in store.done]
    logger.info("%d of %d cells to run in %s", len(todo), len(cells), store.dir)
    placements: dict[tuple[int, float], Any] = {}
    for c in todo:
        if (c.length, c.depth) not in placements:
            placements[(c.length, c.depth)] = hay.place(needle.needle, c.length, c.depth, reserve=cfg.reserve)
        c.placement = placements[(c.length, c.depth)]
        c.prompt = build_prompt(tokenizer, c.placement.text, needle, c.mode, system=cfg.system,
                                system_message=cfg.system_message)
    steer_cfg = steering_config(cfg) if any("steer" in parse_mode(m)[1] for m in cfg.modes) else None
    _generate(cfg, model, tokenizer, todo, steer_cfg,
              lambda cell, answer, secs: store.append([_record(cfg, model_name, needle, hay.id, cell, answer, secs)]))
    records = [store.done[c.key] for c in cells if c.key in store.done]
    summary = write_summary(store.dir, records, cfg.modes, extra={"model": model_name, "needle": needle.name,
                                                                  "haystack": hay.id})
    plots: list[Path] = []
    if plot:
        from ..errors import MissingDependencyError

        try:
            from .plot import plot_results

            plots = plot_results(store.dir, records, cfg.modes)
        except MissingDependencyError as exc:
            logger.warning("no heatmaps: %s", exc)
    return NiahRun(out=store.dir, records=records, summary=summary, plots=plots, new_cells=len(todo))


def _generate(cfg: NiahConfig, model: Any, tokenizer: Any, todo: list[Cell], steer_cfg: Any, done_cb) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="niah", unit="cell", disable=not cfg.progress or not todo)
    try:
        if cfg.batch_size == 1:
            gen = CachedGenerator(model, tokenizer, cfg.max_new_tokens, reuse=cfg.prefix_cache)
            # lexicographic order of token ids = depth-first order of the prefix trie: each prefix is prefilled once
            for cell in sorted(todo, key=lambda c: (c.prompt.steer, c.prompt.rendered.input_ids)):
                bar.set_postfix_str(f"{cell.mode} L={cell.length} d={cell.depth:g}")
                t0 = time.perf_counter()
                answer = gen.generate(cell.prompt.rendered, steer_cfg if cell.prompt.steer else None)
                done_cb(cell, answer, time.perf_counter() - t0)
                bar.update(1)
        else:
            from ..steering import SteeredModel

            models = {False: SteeredModel(model, tokenizer, None), True: SteeredModel(model, tokenizer, steer_cfg)}
            kwargs = greedy_kwargs(model, tokenizer, cfg.max_new_tokens)
            for batch in _batches(todo, cfg.batch_size):
                bar.set_postfix_str(f"{batch[0].mode} L={batch[0].length}")
                t0 = time.perf_counter()
                gcfg = kwargs["generation_config"]
                answers = models[batch[0].prompt.steer].generate_rendered(
                    [c.prompt.rendered for c in batch], max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=gcfg.eos_token_id, pad_token_id=gcfg.pad_token_id)
                secs = (time.perf_counter() - t0) / len(batch)
                for cell, answer in zip(batch, answers):
                    done_cb(cell, answer, secs)
                bar.update(len(batch))
    finally:
        bar.close()
