"""Greedy answers through vLLM's offline engine, with :class:`ctxaware.niah.engine.GreedyEngine`'s contract.

:class:`VllmEngine` ``.run(jobs, on_done)`` answers :class:`~ctxaware.niah.engine.Job` s (a
``RenderedChat`` and whether it is steered) on a ``vllm.LLM`` — what ``--engine vllm`` of niah,
study, mtbench and sft-study's evaluation runs:

* **ctxaware's tokens.** Each prompt goes in as ``prompt_token_ids`` (vLLM's ``TokensPrompt``): the
  tokens are exactly ctxaware's rendering, role spans included, never re-rendered by vLLM. Decoding
  is greedy (temperature 0, ``max_tokens``), stops at the same end tokens as the transformers engine
  (:func:`~ctxaware.steering.model.greedy_generation_config`), ignores the model's
  ``generation_config.json`` sampling defaults, and the answer is decoded by the same tokenizer call,
  so records are identical in format.
* **Prefix caching.** Jobs are fed in the transformers engine's order (steered after plain, each by
  token ids: cells of one haystack are neighbours). A job that shares at least :data:`SHARE_MIN`
  tokens (and the cache salt) with a job still in its prefill waits until that prefill is done, so
  the shared blocks are cached and prefilled once; other jobs join at once, and vLLM's continuous
  batching decodes everything in flight together. At most ``batch_size`` jobs are in flight: an
  interrupted run loses at most those (each answer is reported as soon as it ends).
* **Steering.** A steered job carries ctxaware's ``SamplingParams.extra_args`` and ``cache_salt``
  (:func:`ctxaware.vllm.request.steering_request`), applied by ctxaware's vLLM plugin; an unsteered
  job carries nothing and runs vLLM untouched.
* **One engine per process.** :func:`vllm_llm` keeps one ``vllm.LLM`` per set of arguments (a
  study's NIH parts and MT-Bench share it) and shuts it down at exit (:func:`release`). On CPU with
  one process (tensor × pipeline parallel = 1), the engine core runs in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set): no child process to leave behind.

vLLM is imported here only, inside functions: importing this module never needs it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Sequence

from ..chat.render import common_prefix
from ..niah.engine import Job

logger = logging.getLogger(__name__)

#: a job sharing at least this many prompt tokens with one still prefilling waits for its blocks
SHARE_MIN = 64
_LLMS: dict[str, Any] = {}


def require_vllm() -> Any:
    """``import vllm``, or the one-line :class:`~ctxaware.errors.MissingDependencyError`."""
    try:
        import vllm
    except ImportError as exc:
        from ..engines import missing_vllm

        raise missing_vllm() from exc
    return vllm


def vllm_llm(settings: dict[str, Any]) -> Any:
    """The ``vllm.LLM`` of ``settings`` (``vllm.LLM`` keyword arguments), created once per process."""
    key = json.dumps(settings, sort_keys=True, default=str)
    if key in _LLMS:
        return _LLMS[key]
    vllm = require_vllm()
    from vllm.platforms import current_platform

    args = {"enable_prefix_caching": True, "generation_config": "vllm", **settings}
    parallel = int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))
    if current_platform.is_cpu() and parallel == 1 and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: nothing left behind
    logger.info("starting vLLM %s on %s (%s)", vllm.__version__, args["model"],
                ", ".join(f"{k}={v}" for k, v in args.items() if k != "model"))
    try:
        llm = vllm.LLM(**args)
    except (TypeError, ValueError) as exc:
        from ..errors import ConfigError

        raise ConfigError(f"vLLM refused its settings: {str(exc).splitlines()[0] if str(exc) else exc} "
                          "(check --vllm-options, --tensor-parallel-size, --pipeline-parallel-size)") from exc
    _LLMS[key] = llm
    return llm


def release() -> None:
    """Shut down every vLLM engine this process started (its worker processes end with it)."""
    while _LLMS:
        _, llm = _LLMS.popitem()
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        try:
            if core is not None:
                core.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down at exit: log, never raise
            logger.warning("vLLM engine shutdown: %s", exc)
        del llm, core
    import gc

    gc.collect()  # an in-process engine's weights and KV cache go with their last reference


atexit.register(release)


class Feeder:
    """Which jobs join vLLM's batch when: in order, at most ``limit`` in flight, and a job whose prompt shares
    at least ``share_min`` tokens (same salt) with a job still prefilling waits until that prefill is done."""

    def __init__(self, jobs: Sequence[Job], salts: Sequence[str | None], limit: int,
                 share_min: int = SHARE_MIN) -> None:
        self.jobs, self.salts, self.limit, self.share_min = list(jobs), list(salts), limit, share_min
        self.next = 0
        self.in_flight: set[int] = set()
        self.prefilling: set[int] = set()

    def _waits(self, i: int) -> bool:
        ids = self.jobs[i].rendered.input_ids
        return any(self.salts[p] == self.salts[i]
                   and common_prefix(self.jobs[p].rendered.input_ids, ids) >= self.share_min
                   for p in self.prefilling)

    def admit(self) -> list[int]:
        """Indices of the jobs to add now (in order), marked in flight and prefilling."""
        out = []
        while self.next < len(self.jobs) and len(self.in_flight) < self.limit and not self._waits(self.next):
            out.append(self.next)
            self.in_flight.add(self.next)
            self.prefilling.add(self.next)
            self.next += 1
        return out

    def prefilled(self, i: int) -> None:
        self.prefilling.discard(i)

    def finished(self, i: int) -> None:
        self.prefilling.discard(i)
        self.in_flight.discard(i)

    @property
    def done(self) -> bool:
        return self.next == len(self.jobs) and not self.in_flight


class VllmEngine:
    """Greedy decoding of many prompts on a ``vllm.LLM`` (see the module doc); ``run(jobs, on_done)`` as
    :class:`~ctxaware.niah.engine.GreedyEngine`. ``steer_config`` applies to jobs with ``steer=True``."""

    def __init__(self, llm: Any, tokenizer: Any, max_new_tokens: int, *, steer_config: Any = None,
                 batch_size: int = 8, share_min: int = SHARE_MIN) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        from ..steering.model import _as_list, greedy_generation_config

        if steer_config is not None and steer_config.active:
            from ..errors import SteeringError
            from .plugin import inactive_reason
            from .request import check_supported

            check_supported(steer_config)
            reason = inactive_reason()
            if reason:  # refused before any prompt, never answered unsteered
                raise SteeringError(f"steered prompts need ctxaware's vLLM plugin, but {reason}")
        self.llm, self.tokenizer = llm, tokenizer
        self.max_new_tokens, self.steer_config = max_new_tokens, steer_config
        self.batch_size, self.share_min = batch_size, share_min
        model_cfg = getattr(getattr(llm, "llm_engine", None), "model_config", None)
        base = _GenerationDefaults(getattr(model_cfg, "model", None), getattr(model_cfg, "hf_config", None))
        self.eos = [int(t) for t in _as_list(greedy_generation_config(base, tokenizer, max_new_tokens).eos_token_id)]
        # what the work cost, for tests and benchmarks
        self.prompt_tokens, self.cached_tokens, self.steps = 0, 0, 0

    def order(self, jobs: Iterable[Job]) -> list[Job]:
        """The order jobs are fed in: steered after unsteered, each group by token ids (as the transformers engine)."""
        return sorted(jobs, key=lambda j: (j.steer, list(j.rendered.input_ids)))

    def request(self, job: Job) -> tuple[dict[str, Any], Any]:
        """The vLLM prompt (``TokensPrompt``: token ids, cache salt) and ``SamplingParams`` of one job."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from .request import steering_request

        ids = [int(t) for t in job.rendered.input_ids]
        if not ids:
            raise ValueError("cannot answer an empty prompt")
        steering = steering_request(self.steer_config if job.steer else None, job.rendered, source="engine")
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if steering.cache_salt is not None:
            prompt["cache_salt"] = steering.cache_salt
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, stop_token_ids=self.eos,
                                detokenize=False, output_kind=RequestOutputKind.DELTA,
                                extra_args=steering.extra_args or None)
        return prompt, params

    def run(self, jobs: Sequence[Job], on_done: Callable[[Job, str], None]) -> None:
        """Answer every job; ``on_done(job, answer)`` as soon as its answer ends (``job.seconds``: its share of
        each engine step it was in flight for; ``job.new_tokens``; ``job.truncated``: stopped by max_new_tokens)."""
        order = self.order(jobs)
        requests = [self.request(job) for job in order]  # every steering checked before the first request
        feeder = Feeder(order, [p.get("cache_salt") for p, _ in requests], self.batch_size, self.share_min)
        engine = self.llm.llm_engine
        tokens: dict[int, list[int]] = {}
        ids = {}
        try:
            while not feeder.done:
                for i in feeder.admit():
                    rid = f"ctxaware-{id(self)}-{i}"
                    ids[rid] = i
                    tokens[i] = []
                    order[i].seconds = 0.0
                    engine.add_request(rid, *requests[i])
                    self.prompt_tokens += len(requests[i][0]["prompt_token_ids"])
                t0 = time.perf_counter()
                outputs = engine.step()
                self.steps += 1
                share = (time.perf_counter() - t0) / max(1, len(feeder.in_flight))
                for i in feeder.in_flight:
                    order[i].seconds += share
                for out in outputs:
                    i = ids.get(out.request_id)
                    if i is None:
                        continue
                    tokens[i] += list(out.outputs[0].token_ids)
                    feeder.prefilled(i)
                    if out.finished:
                        self.cached_tokens += int(out.num_cached_tokens or 0)
                        feeder.finished(i)
                        self._report(order[i], tokens.pop(i), out.outputs[0], on_done)
        finally:
            left = [rid for rid, i in ids.items() if i in feeder.in_flight]
            if left:
                engine.abort_request(left)

    def _report(self, job: Job, tokens: list[int], completion: Any, on_done: Callable[[Job, str], None]) -> None:
        stop = getattr(completion, "stop_reason", None)
        if completion.finish_reason == "stop" and isinstance(stop, int) and (not tokens or tokens[-1] != stop):
            tokens.append(stop)  # the end token counts, as in the transformers engine
        job.new_tokens = len(tokens)
        job.truncated = not (tokens and tokens[-1] in self.eos)
        on_done(job, self.tokenizer.decode(tokens, skip_special_tokens=True).strip())


class _GenerationDefaults:
    """The model's generation config as transformers loads it (``generation_config.json``, else derived from the
    model config): where ``greedy_generation_config`` finds the end tokens, as for the transformers engine."""

    def __init__(self, path: str | None, hf_config: Any) -> None:
        from transformers import GenerationConfig

        self.generation_config = None
        try:
            self.generation_config = GenerationConfig.from_pretrained(path) if path else None
        except (OSError, ValueError):
            pass
        if self.generation_config is None and hf_config is not None:
            try:
                self.generation_config = GenerationConfig.from_model_config(hf_config)
            except Exception:  # noqa: BLE001 - an exotic config: the tokenizer's end token still applies
                self.generation_config = None


def generate_rendered(engine: VllmEngine, rendered: Sequence[Any], *, steer: bool = False) -> list[str]:
    """Answers to ``rendered`` prompts, in their order (what MT-Bench turns go through)."""
    jobs = [Job(r, steer=steer, tag=k) for k, r in enumerate(rendered)]
    answers: dict[int, str] = {}
    engine.run(jobs, lambda job, text: answers.__setitem__(job.tag, text))
    return [answers[k] for k in range(len(jobs))]


__all__ = ["SHARE_MIN", "Feeder", "VllmEngine", "generate_rendered", "release", "require_vllm", "vllm_llm"]
