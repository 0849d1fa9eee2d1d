"""Running an NIH study: grid of cells → prompts → greedy answers (± steering) → scored JSONL.

Speed, on CPU as on GPU: the haystack is read and tokenised once; cells are rendered up front and
answered by :class:`ctxaware.niah.engine.GreedyEngine`, which prefills each distinct prompt prefix
once (cells in lexicographic order of their token ids, one KV cache cropped to the shared prefix)
and decodes ``batch_size`` cells together.
Decoding is greedy whatever the model's generation config says.

Sharding: the grid's decoding batches are planned first, from every cell (:func:`plan_batches`: the plan an
unsharded run decodes), and with ``shard="i/n"`` a run answers the whole batches ``i, i + n, i + 2n, ...``
into its own shard files (:class:`~ctxaware.niah.results.ResultStore`) and writes no summary or plot; a
later run without a shard merges them. Since a greedy answer depends on its decoding batch (in bf16) and
on nothing else (:class:`~ctxaware.niah.engine.GreedyEngine`), merged shards equal the unsharded run byte for
byte, with any number of shards; a resumed run decodes the unfinished batches whole for the same reason.
Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE > 1``, no explicit shard) every process takes
shard rank/world on its own device, and the main process merges after a barrier and writes summary and
heatmaps. Keys carry the digest of the cell's result identity (:func:`niah_identity`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import NiahConfig, parse_mode
from .haystack import Haystack, read_haystack
from .needles import Needle, load_needle
from .prompts import Prompt, build_prompt
from .results import ResultStore, cell_key, read_timings, with_seconds, write_plan, write_summary
from .scoring import format_table, found_keywords, recall, summarize

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
    truncated: bool | None = None  # set by the engine: the answer stopped at max_new_tokens
    answer_tokens: int | None = None


@dataclass
class NiahRun:
    """What :func:`run_niah` returns: all records of the study, the summary, and the files written."""

    out: Path
    records: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    plots: list[Path] = field(default_factory=list)
    new_cells: int = 0
    shard: tuple[int, int] = (0, 1)  # (i, n) of a shard's run (records then are its own cells)

    def table(self) -> str:
        return format_table(self.summary)


def steering_config(config: NiahConfig):
    """The :class:`SteeringConfig` of ``+steer`` modes: the steering file's, else ``alpha``/``heads``."""
    if config.steering:
        from ..steering.file import load_steering_file

        return load_steering_file(config.steering)
    from ..steering import SteeringConfig

    return SteeringConfig(alpha=float(config.alpha), heads=config.heads)


def _steer_tag(steer: Any) -> tuple[float, str]:
    """``(alpha, heads)`` as they go into keys and records; emphasis/compounding only when not default."""
    heads = steer.heads if isinstance(steer.heads, str) else json.dumps(steer.heads, sort_keys=True)
    extra = "".join(f"|{k}={getattr(steer, k)}" for k, default in (("emphasis", "user"), ("compounding", "none"))
                    if getattr(steer, k) != default)
    return float(steer.alpha), heads + extra


def check_grid(cfg: NiahConfig, model: Any, steer: Any) -> list[int]:
    """Refuse what would fail mid-grid, before any cell runs: lengths beyond the model's window (or clamp them
    with a warning under ``truncate``) and steered heads the model does not have. Returns the lengths."""
    from ..errors import ConfigError

    lengths = cfg.grid_lengths()
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(text_cfg, "max_position_embeddings", None)
    if window:
        over = [L for L in lengths if L > int(window)]
        if over and not cfg.truncate:
            raise ConfigError(f"lengths {', '.join(map(str, over))} exceed the model's window of {window} tokens; "
                              f"use lengths <= {window}, or --truncate to clamp them to the window")
        if over:
            logger.warning("lengths %s exceed the model's window: clamped to %d tokens", over, window)
            lengths = sorted({min(L, int(window)) for L in lengths})
    if steer is not None:
        from ..attention.backend import model_dims

        steer.resolve_heads(*model_dims(model))
    return lengths


def _record(steer_tag: tuple[float, str], model_name: str, needle: Needle, haystack_id: str, cell: Cell,
            answer: str, steer_id: Any = None) -> dict[str, Any]:
    """What a cell computed (no wall-clock time: that goes to ``timings.jsonl``, keeping this reproducible)."""
    r = cell.prompt.rendered
    rec = {
        "key": cell.key, "model": model_name, "mode": cell.mode, "needle": needle.name, "haystack": haystack_id,
        "length": cell.length, "tokens": r.prompt_len, "depth": cell.depth,
        "needle_token": cell.placement.needle_token_index, "haystack_tokens": cell.placement.haystack_tokens,
        "prompt_sha256": hashlib.sha256(r.text.encode("utf-8")).hexdigest(),
        "answer": answer, "recall": recall(answer, needle.keywords),
    }
    if cell.truncated is not None:  # cut by the token budget: not evidence about the template or steering
        rec["truncated"], rec["answer_tokens"] = bool(cell.truncated), cell.answer_tokens
    if cell.prompt.prefix:
        rec["prefix"] = cell.prompt.prefix
    if cell.prompt.steer:
        rec["alpha"], rec["heads"] = steer_tag
        if steer_id is not None:  # the whole steering (rule, share, ...): reports tell settings apart by it
            rec["steering"] = steer_id.to_dict()["steering"]
    if not needle.single:  # tasks: where each sentence went, what was recalled, and distraction
        rec["positions"] = list(cell.placement.positions)
        rec["found"] = found_keywords(answer, needle.keywords)
        if needle.distractors:
            values = [v for d in needle.distractors for v in found_keywords(answer, d.values)]
            rec["distracted"], rec["distractor_values"] = bool(values), values
    return rec


def plan_cells(cfg: NiahConfig, model_name: str, needle: Needle, haystack_id: str,
               lengths: list[int] | None = None, digests: tuple[str, str] = ("", "")) -> list[Cell]:
    """All cells of the grid (length-major, then depth, then mode), with their resume keys; ``digests`` are the
    identity digests of unsteered and ``+steer`` cells (:func:`cell_identities`)."""
    cells = []
    for length in lengths or cfg.grid_lengths():
        for depth in cfg.grid_depths():
            for mode in cfg.modes:
                digest = digests[1] if "steer" in parse_mode(mode)[1] else digests[0]
                key = cell_key(model=model_name, mode=mode, needle=needle.name, length=length, depth=depth,
                               haystack=haystack_id, identity=digest)
                cells.append(Cell(mode, length, depth, key))
    return cells


def display_name(model: str | None) -> str:
    """The model's name in records: the embedded model's name, else the name or path as given."""
    from ..models import DEFAULT_MODEL, EMBEDDED_NAME

    return EMBEDDED_NAME if model in (None, DEFAULT_MODEL) else str(model)


def niah_identity(cfg: NiahConfig, needle: Needle, haystack_id: str, *, model_ref: str, dtype: str, device: str,
                  steering: Any = None) -> Any:
    """The :class:`~ctxaware.identity.Identity` of a directory's cells (``steering``: that of ``+steer`` cells)."""
    from ..identity import result_identity

    return result_identity(
        "niah-cell", model=model_ref, dtype=dtype, device=device, engine=getattr(cfg, "engine", "transformers"),
        steering=steering, max_new_tokens=cfg.max_new_tokens,
        batch={"batch_size": cfg.batch_size, "batch_memory": float(cfg.batch_memory), "prefill_chunk": cfg.prefill_chunk},
        extra={"needle": needle.to_dict(), "haystack": haystack_id, "reserve": cfg.reserve, "system": cfg.system,
               "system_message": cfg.system_message})


def _resolved(cfg: NiahConfig, model: Any, model_name: str | None) -> tuple[str, str, str]:
    """``(model reference, dtype, device class)`` of the run, before any model is loaded (or of the model given)."""
    from ..identity import device_class, model_dtype, model_id, model_ref, resolve_dtype

    if model is not None:
        return model_ref(cfg.model, model_name, given=True), model_dtype(model), device_class(model)
    device = cfg.device
    if device is None:
        from ..models import default_device

        device = default_device()
    from ..models import check_device

    check_device(device)
    return model_id(cfg.model), resolve_dtype(cfg.dtype, device), device_class(device)


def run_niah(config: NiahConfig | None = None, *, model: Any = None, tokenizer: Any = None,
             model_name: str | None = None, plot: bool = True) -> NiahRun:
    """Run (or resume) the study of ``config``; returns all records and the per-mode summary.

    ``model``/``tokenizer`` may be given to reuse a loaded model (``model_name`` then names it in
    the records; default ``config.model``). A shard's run returns the records of its own cells.
    """
    from ..distributed import Launched, parse_shard

    cfg = config or NiahConfig()
    needle = load_needle(cfg.needle)
    hay_text = read_haystack(cfg.haystack)
    use_steer = any("steer" in parse_mode(m)[1] for m in cfg.modes)
    steer_cfg = steering_config(cfg) if use_steer else None
    shard = parse_shard(cfg.shard)
    launch = Launched() if cfg.shard is None and shard[1] > 1 else None
    manifest_config = {k: v for k, v in cfg.to_dict().items() if k != "shard"}
    if launch is not None:
        shard = (launch.rank, launch.world)
        if cfg.device is None and not cfg.device_map:
            cfg = dataclasses.replace(cfg, device=launch.device)
    ref, dtype, device = _resolved(cfg, model if tokenizer is not None else None, model_name)
    base_id = niah_identity(cfg, needle, hay_text.id, model_ref=ref, dtype=dtype, device=device)
    steer_id = niah_identity(cfg, needle, hay_text.id, model_ref=ref, dtype=dtype, device=device,
                             steering=steer_cfg) if steer_cfg is not None else base_id

    def open_store(at: tuple[int, int], overwrite: bool = cfg.overwrite) -> ResultStore:
        return ResultStore(cfg.out, base_id.to_dict(), overwrite=overwrite, config=manifest_config, shard=at)

    if launch is not None and not launch.main:
        launch.barrier()  # the main process checks (or clears) the directory first
    store = open_store(shard)
    try:
        if launch is not None and launch.main:
            launch.barrier()
        if model is None or tokenizer is None:
            from ..engines import load_for_engine

            loaded = load_for_engine(cfg)  # --engine vllm: tokenizer and config only, the weights live in vLLM
            model, tokenizer, model_name = loaded.model, loaded.tokenizer, model_name or loaded.name
            from ..identity import model_dtype

            # the identity was resolved before loading: the dtype must be what loaded (the device class is the
            # one asked for; with --device-map the first layer may sit elsewhere)
            if cfg.engine == "transformers" and model_dtype(model) != dtype:
                from ..errors import ConfigError

                raise ConfigError(f"the model loaded as {model_dtype(model)}, not {dtype} as resolved; pass --dtype "
                                  "explicitly")
        model_name = model_name or display_name(cfg.model)
        lengths = check_grid(cfg, model, steer_cfg)
        steer_tag = _steer_tag(steer_cfg) if steer_cfg is not None else (float(cfg.alpha), cfg.heads)
        hay = Haystack(hay_text, tokenizer)
        hay.token_ids(max(lengths))
        cells = plan_cells(cfg, model_name, needle, hay.id, lengths, (base_id.digest, steer_id.digest))
        batches = None
        if store.sharded or any(c.key not in store.done for c in cells):
            _build_prompts(cfg, tokenizer, hay, needle, cells)
            batches = plan_batches(cfg, model, tokenizer, cells, steer_cfg)
        mine_batches = batches[shard[0]::shard[1]] if batches is not None else [cells]
        in_mine = {id(c) for b in mine_batches for c in b}
        mine = [c for c in cells if id(c) in in_mine]  # grid order
        todo = [c for c in mine if c.key not in store.done]
        logger.info("%d of %d cells to run in %s%s", len(todo), len(mine), store.dir,
                    f" (shard {shard[0]}/{shard[1]} of {len(cells)} cells)" if store.sharded else "")

        def done(cell: Cell, answer: str, secs: float) -> None:
            if cell.key not in store.done:  # a batch rerun whole after a kill: its finished cells are kept
                store.append([_record(steer_tag, model_name, needle, hay.id, cell, answer, steer_id)],
                             seconds={cell.key: secs})

        if todo:
            _generate(cfg, model, tokenizer, todo, steer_cfg, done,
                      batches=[b for b in mine_batches if any(c.key not in store.done for c in b)])
        store.finalize([c.key for c in mine])  # grid order, whatever order the cells finished in
    finally:
        store.close()
    if launch is not None:
        launch.barrier()  # every shard is written (and its lock released)
        if launch.main:
            store = open_store((0, 1), overwrite=False)  # reads every shard file; finalize merges them
            try:
                store.finalize([c.key for c in cells])
            finally:
                store.close()
    if store.sharded:
        records = [store.done[c.key] for c in mine if c.key in store.done]
        summary = summarize(with_seconds(records, read_timings(store.dir, store.timings)), cfg.modes,
                            threshold=cfg.effective_threshold)
        return NiahRun(out=store.dir, records=records, summary=summary, new_cells=len(todo), shard=shard)
    records = [store.done[c.key] for c in cells if c.key in store.done]
    write_plan(store.dir, [c.key for c in cells])
    summary = write_summary(store.dir, records, cfg.modes, extra={"model": model_name, "needle": needle.name,
                                                                  "haystack": hay.id},
                            threshold=cfg.effective_threshold)
    plots: list[Path] = []
    if plot:
        from ..errors import MissingDependencyError

        try:
            from .plot import plot_results

            plots = plot_results(store.dir, records, cfg.modes)
        except MissingDependencyError as exc:
            logger.warning("no heatmaps: %s", exc)
    return NiahRun(out=store.dir, records=records, summary=summary, plots=plots, new_cells=len(todo))


def _build_prompts(cfg: NiahConfig, tokenizer: Any, hay: Haystack, needle: Needle, cells: list[Cell]) -> None:
    placements: dict[tuple[int, float], Any] = {}
    for c in cells:
        if (c.length, c.depth) not in placements:
            placements[(c.length, c.depth)] = hay.place_task(needle, c.length, c.depth, reserve=cfg.reserve)
        c.placement = placements[(c.length, c.depth)]
        c.prompt = build_prompt(tokenizer, c.placement.text, needle, c.mode, system=cfg.system,
                                system_message=cfg.system_message)


def plan_batches(cfg: NiahConfig, model: Any, tokenizer: Any, cells: list[Cell], steer_cfg: Any) -> list[list[Cell]]:
    """The decoding batches of the WHOLE grid (:meth:`GreedyEngine.plan`), formed before any work: shards take
    whole batches of it (``batches[i::n]``), so a sharded grid answers byte for byte as an unsharded one."""
    if getattr(cfg, "engine", "transformers") != "transformers":
        # vLLM forms its own batches; a shard takes whole (length, depth) groups: every mode of one placement,
        # whose prompts share their haystack prefix in vLLM's prefix cache
        groups: dict[tuple[int, float], list[Cell]] = {}
        for c in cells:
            groups.setdefault((c.length, c.depth), []).append(c)
        return list(groups.values())
    from .engine import GreedyEngine, Job

    engine = GreedyEngine(model, tokenizer, cfg.max_new_tokens, steer_config=steer_cfg, reuse=cfg.prefix_cache,
                          batch_size=cfg.batch_size, batch_memory=cfg.batch_memory, chunk=cfg.prefill_chunk)
    return [[j.tag for j in b] for b in engine.plan([Job(c.prompt.rendered, steer=c.prompt.steer, tag=c)
                                                       for c in cells])]


def _generate(cfg: NiahConfig, model: Any, tokenizer: Any, todo: list[Cell], steer_cfg: Any, done_cb,
              batches: list[list[Cell]] | None = None) -> None:
    """Answer ``todo``; ``batches`` (whole batches of the grid's plan holding them) are decoded as planned, and
    ``done_cb`` then also gets cells of those batches that were already done (it skips them)."""
    from tqdm.auto import tqdm

    from ..engines import make_engine
    from .engine import Job

    engine = make_engine(cfg, model, tokenizer, cfg.max_new_tokens, steer_config=steer_cfg, batch_size=cfg.batch_size,
                         reuse=cfg.prefix_cache, batch_memory=cfg.batch_memory, chunk=cfg.prefill_chunk)
    jobs = [Job(c.prompt.rendered, steer=c.prompt.steer, tag=c) for c in todo]
    total = len(todo) if batches is None or cfg.engine != "transformers" else sum(len(b) for b in batches)
    bar = tqdm(total=total, desc="niah", unit="cell", disable=not cfg.progress or not todo)

    def finished(job: Job, answer: str) -> None:
        cell = job.tag
        cell.truncated, cell.answer_tokens = job.truncated, job.new_tokens
        bar.set_postfix_str(f"{cell.mode} L={cell.length} d={cell.depth:g}")
        done_cb(cell, answer, job.seconds)
        bar.update(1)

    try:
        if batches is None or cfg.engine != "transformers":  # vLLM schedules its own batches
            engine.run(jobs, finished)
        else:
            engine.run_batches([[Job(c.prompt.rendered, steer=c.prompt.steer, tag=c) for c in b] for b in batches],
                               finished)
    finally:
        bar.close()
