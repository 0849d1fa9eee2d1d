"""``ContextAwarenessCallback``: context awareness measured while a model fine-tunes, without changing training.

A ``transformers.TrainerCallback`` for any ``Trainer``/``SFTTrainer`` (full, LoRA, QLoRA, PEFT models, one
or several processes). Every ``every`` optimiser steps (default: the trainer's ``eval_steps`` when it
evaluates by steps, else its ``save_steps``), it runs the fixed probe set of :mod:`.probe` on the model
being trained and

- logs the ``context/...`` metrics through ``trainer.log`` (so every ``report_to`` integration,
  TensorBoard, W&B, trackio, MLflow, CSV, receives them) when the callback knows its trainer
  (:meth:`ContextAwarenessCallback.attach`); otherwise into ``state.log_history`` only;
- appends one record per probe to ``<output_dir>/context_awareness.jsonl`` (fsynced), keyed by step and
  the probe's result identity (:func:`ctxaware.identity.result_identity`): a resumed run re-logs the
  records it finds and never probes or appends a step twice;
- optionally stops training, saving a checkpoint, when the template gap exceeds ``stop_gap`` at
  ``stop_patience`` consecutive probes.

Training is unchanged: around a probe the model's per-module train/eval flags, ``config.use_cache``,
gradient checkpointing, grad mode and the python, numpy, torch CPU and CUDA RNG states are saved and
restored (tests compare loss curves with and without the callback). Under several processes (accelerate,
DeepSpeed ZeRO-1/2, DDP) only the main process probes; the others wait in the broadcast of its result,
so every process logs the same values and takes the same stopping decision. A model whose parameters
are sharded across processes (FSDP, ZeRO-3) cannot be probed on one process and is refused at the start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback

from ..errors import ConfigError
from .probe import PREFIX, ContextProbe, MonitorConfig

logger = logging.getLogger(__name__)
GAP = f"{PREFIX}template_gap"


def inner_model(model: Any) -> Any:
    """The module that computes: without DDP/DeepSpeed/compile wrappers, and the PEFT base model (whose layers
    carry the adapters, so it computes what the PEFT model computes)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    if hasattr(model, "get_base_model") and getattr(model, "peft_config", None):
        model = model.get_base_model()
    return model


def _checkpointing(model: Any) -> bool:
    # transformers >= 5.20 renamed gradient checkpointing to activation checkpointing
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


@contextlib.contextmanager
def preserved_training_state(model: Any) -> Iterator[None]:
    """Eval mode and no grad inside; on exit every module's training flag, ``use_cache``, gradient
    checkpointing, grad mode and the python/numpy/torch (CPU, CUDA) RNG states are as they were."""
    import numpy as np
    import torch

    flags = [(m, m.training) for m in model.modules()]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    checkpointing = _checkpointing(model)
    grad = torch.is_grad_enabled()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        if _checkpointing(model) != checkpointing:  # pragma: no cover
            logger.warning("a probe changed gradient checkpointing; restoring it")
            if checkpointing:
                model.gradient_checkpointing_enable()
            else:
                model.gradient_checkpointing_disable()
        torch.set_grad_enabled(grad)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _sharded(args: Any) -> str | None:
    """Why the model is sharded across processes (FSDP, ZeRO-3), or None."""
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP"
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return "DeepSpeed ZeRO-3"
    except ImportError:  # pragma: no cover
        pass
    return None


class ContextAwarenessCallback(TrainerCallback):
    """Probe context awareness during training (see the module doc).

    ``ContextAwarenessCallback(tokenizer=tok, config=MonitorConfig(...)).attach(trainer)`` adds it to
    ``trainer`` and logs through ``trainer.log``; ``Trainer(callbacks=[cb])`` works too (then the metrics
    reach ``state.log_history`` and the JSONL, not the trackers). ``tokenizer`` defaults to the trainer's
    ``processing_class``. ``config`` keyword arguments may be given directly (``every=10``).
    """

    def __init__(self, tokenizer: Any = None, config: MonitorConfig | None = None, *, trainer: Any = None,
                 **options: Any) -> None:
        if config is not None and options:
            raise ConfigError("pass either a MonitorConfig or its options, not both")
        self.config = config if config is not None else MonitorConfig(**options)
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.records: dict[str, dict[str, Any]] = {}  # key -> record, this run's and a resumed run's
        self.history: list[dict[str, Any]] = []  # step and metrics of each probe of this run, in order
        self._trail: list[dict[str, Any]] = []  # the same from step 1 on, a resumed run's earlier probes first
        self.stopped_at: int | None = None
        self.seconds = 0.0  # wall time spent probing in this process (the cost of monitoring)
        self.cpu_seconds = 0.0  # CPU time of this process spent probing (all its threads; robust to a busy machine)
        self._probe: ContextProbe | None = None
        self._ident: Any = None
        self._path: Path | None = None
        self._last_step = -1

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> ContextAwarenessCallback:
        """Add the callback to ``trainer`` and log through its ``log`` (every ``report_to`` integration)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def every(self, args: Any) -> int:
        """The probing interval in optimiser steps."""
        if self.config.every:
            return int(self.config.every)
        strategy = str(getattr(args, "eval_strategy", "no"))
        if strategy.endswith("steps") and getattr(args, "eval_steps", None):
            return max(1, int(args.eval_steps))
        return max(1, int(args.save_steps)) if getattr(args, "save_steps", 0) and args.save_steps >= 1 else 50

    @property
    def path(self) -> Path | None:
        return self._path

    def _identity(self, model: Any, tokenizer: Any) -> Any:
        from ..identity import model_dtype, prompt_digest, result_identity

        probe = self.config.probe_dict()
        name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        tok = {"name": getattr(tokenizer, "name_or_path", ""), "vocab": len(tokenizer),
               "template": prompt_digest(getattr(tokenizer, "chat_template", None) or "")}
        return result_identity("context-monitor", model=name, dtype=model_dtype(model),
                               device=str(next(model.parameters()).device), template=tok["template"],
                               max_new_tokens=self.config.max_new_tokens, prompt=prompt_digest([probe, tok]),
                               batch={"batch_size": self.config.batch_size}, extra={"probe": probe})

    def _key(self, step: int) -> str:
        return f"step={step}|id={self._ident.digest}"

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        why = _sharded(args)
        if why:
            raise ConfigError(f"the context-awareness monitor probes the whole model on the main process, but {why} "
                              "shards it across processes; monitor a DDP or ZeRO-1/2 run, or probe saved checkpoints")
        tokenizer = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
        if tokenizer is None:
            raise ConfigError("ContextAwarenessCallback needs a tokenizer: pass tokenizer=... or give the trainer "
                              "a processing_class")
        self.tokenizer = tokenizer
        net = inner_model(model)
        self._ident = self._identity(net, tokenizer)
        self._path = Path(args.output_dir) / self.config.file
        if self._path.is_file():
            from ..fsio import read_jsonl

            for rec in read_jsonl(self._path, repair=state.is_world_process_zero, what="monitor file"):
                if rec.get("identity") == self._ident.digest:
                    self.records.setdefault(rec["key"], rec)
        # the stopping rule counts consecutive probes across a resume: the stored ones up to the resumed step
        self._trail = [{"step": r["step"], **r["metrics"]} for r in sorted(self.records.values(), key=lambda r: r["step"])
                       if 0 < r["step"] <= state.global_step]
        if self.config.at_start and state.global_step == 0:
            self._probe_step(args, state, control, model)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if state.global_step % self.every(args) == 0:
            self._probe_step(args, state, control, model)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.config.at_end and self._last_step != state.global_step and self.stopped_at is None:
            self._probe_step(args, state, control, model)
        return control

    # ------------------------------------------------------------------ one probe
    def measure(self, model: Any) -> dict[str, Any]:
        """Run the probe set on ``model`` with the training state preserved; the probe's result."""
        net = inner_model(model)
        if self._probe is None:
            self._probe = ContextProbe(self.config, self.tokenizer)
        with preserved_training_state(net):
            return self._probe.run(net)

    def _probe_step(self, args: Any, state: Any, control: Any, model: Any) -> None:
        step = int(state.global_step)
        self._last_step = step
        key = self._key(step)
        t0, c0 = time.perf_counter(), time.process_time()
        main = bool(state.is_world_process_zero)
        record = self.records.get(key) if main else None
        fresh, error = record is None, None
        if fresh and main:
            try:
                result = self.measure(model)
                record = {"key": key, "identity": self._ident.digest, "step": step, "epoch": state.epoch,
                          "metrics": result["metrics"], "cells": result["cells"], "seconds": result["seconds"],
                          "probe": self.config.probe_dict(), "time": datetime.now(timezone.utc).isoformat()}
                if "qa" in result:
                    record["qa"] = result["qa"]
            except Exception as exc:  # noqa: BLE001 - the other processes must hear of it, not hang
                error = f"{type(exc).__name__}: {exc}"
                if not _dist():
                    raise
        dist = _dist()
        if dist is not None:  # the other processes wait here for the main one's result (or its stored record)
            box = [record, error, fresh]
            dist.broadcast_object_list(box, src=0)
            record, error, fresh = box
        if error:
            raise ConfigError(f"the context-awareness probe failed at step {step}: {error}")
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        if fresh:
            record["seconds"]["total"] = round(time.perf_counter() - t0, 3)
            self.records[key] = record
            if main and self._path is not None:
                from ..fsio import append_jsonl

                append_jsonl(self._path, record)
        metrics = dict(record["metrics"])
        self.history.append({"step": step, **metrics})
        if step > 0:
            self._trail.append({"step": step, **metrics})
        self._log(state, control, metrics)
        self._maybe_stop(step, metrics, control)

    def _log(self, state: Any, control: Any, metrics: dict[str, float]) -> None:
        if self.trainer is not None:
            # the Trainer's on_log clears should_log: the loss due at this step would be logged later, averaged
            # over more steps; keep the flag so that the loss curve is logged as without the monitor
            should_log = control.should_log
            self.trainer.log(dict(metrics))
            control.should_log = should_log
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def _maybe_stop(self, step: int, metrics: dict[str, float], control: Any) -> None:
        cfg = self.config
        if cfg.stop_gap is None or GAP not in metrics or step == 0:
            return
        run = 0
        for h in reversed(self._trail):
            if h.get(GAP, float("-inf")) > cfg.stop_gap:
                run += 1
            else:
                break
        if run >= cfg.stop_patience:
            logger.warning("template gap %.3f > %.3f at %d consecutive probes: stopping at step %d and saving",
                           metrics[GAP], cfg.stop_gap, run, step)
            self.stopped_at = step
            control.should_training_stop = True
            control.should_save = True


__all__ = ["ContextAwarenessCallback", "MonitorConfig", "inner_model", "preserved_training_state"]
