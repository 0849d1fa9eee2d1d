"""lm-evaluation-harness integration: the ``ctxaware`` model class and the contextual-QA tasks.

- :class:`CtxawareLM` (``ctxaware.harness.model``, imported lazily because it needs ``lm_eval``):
  an HFLM subclass registered as ``ctxaware`` that renders every request itself and steers the
  model calls. ``lm_eval.simple_evaluate(model=CtxawareLM(alpha=0.9), tasks=[...],
  task_manager=task_manager())`` or, after ``import ctxaware.harness.model``, ``model="ctxaware"``.
- :data:`TASKS_DIR`: the shipped task YAMLs (``ctxaware_{squad,quac,drop}_{ind,no_ind,no_template}``,
  groups ``ctxaware_squad``/``ctxaware_quac``/``ctxaware_drop``/``ctxaware_qa``); give it to lm-eval
  as ``include_path``.
- ``python -m ctxaware.harness ...``: the stock lm-eval CLI with the model registered and the
  tasks included (lm-eval 0.4.13 reads no plugin entry points, so a bare ``lm_eval`` cannot see
  ``--model ctxaware``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR", "CtxawareLM", "task_manager"]


def task_manager(data_dir: str | None = None, include_path: str | list[str] | None = None,
                 metadata: dict[str, Any] | None = None, *, include_defaults: bool = True) -> Any:
    """An ``lm_eval.tasks.TaskManager`` that knows the shipped tasks (plus ``include_path``).

    ``data_dir`` (a folder of local data files, see :mod:`ctxaware.harness.data`) is handed to the
    tasks through lm-eval's task metadata. ``include_defaults=False`` leaves out lm-eval's own
    tasks: indexing their thousands of YAML files takes ~15 s, the ctxaware tasks alone well under 1 s.
    """
    from ..errors import require

    tasks = require("lm_eval.tasks", "eval")
    paths = [str(TASKS_DIR)]
    if include_path:
        paths += [include_path] if isinstance(include_path, str) else list(include_path)
    meta = dict(metadata or {})
    if data_dir is not None:
        meta["data_dir"] = str(data_dir)
    return tasks.TaskManager(include_path=paths, include_defaults=include_defaults, metadata=meta)


def __getattr__(name: str) -> Any:
    if name == "CtxawareLM":
        from ..errors import require

        require("lm_eval", "eval")
        from .model import CtxawareLM

        return CtxawareLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
