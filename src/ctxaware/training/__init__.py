"""Conditional instruction fine-tuning with the ``[IND]`` indicator (METHOD §4), on TRL and PEFT.

``TrainConfig`` (a recipe), ``load_recipe``/``list_recipes`` (the shipped recipes), ``train``
(build, run and save), ``build_trainer`` (a ready ``trl.SFTTrainer``) and
``ContextAwarenessCallback`` (context awareness probed during any Trainer's training). Imported lazily: trl,
peft and torch load only when training starts.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "TrainConfig": "ctxaware.training.config",
    "load_recipe": "ctxaware.training.config",
    "list_recipes": "ctxaware.training.config",
    "recipe_path": "ctxaware.training.config",
    "train": "ctxaware.training.trainer",
    "build_trainer": "ctxaware.training.trainer",
    "save_trained": "ctxaware.training.trainer",
    "TrainResult": "ctxaware.training.trainer",
    "build_dataset": "ctxaware.training.data",
    "assistant_labels": "ctxaware.training.data",
    "add_indicator_token": "ctxaware.training.conditions",
    "strip_indicator": "ctxaware.training.conditions",
    "INDICATOR": "ctxaware.training.conditions",
    "ContextAwarenessCallback": "ctxaware.training.callback",
    "MonitorConfig": "ctxaware.training.probe",
    "ContextProbe": "ctxaware.training.probe",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
