"""The training recipe: :class:`TrainConfig`, shipped recipes, and the mapping onto ``trl.SFTConfig``.

A recipe is a YAML file of :class:`TrainConfig` fields (see ``recipes/*.yaml``). ``TrainConfig``
*wraps* ``trl.SFTConfig`` rather than extending it, so that this module (and the CLI built from
its fields) imports neither trl nor torch; :meth:`TrainConfig.sft_config` builds the ``SFTConfig``
on demand, and any other ``SFTConfig``/``TrainingArguments`` field can be set under ``sft:``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import ConfigMixin, field, read_config_file
from ..errors import ConfigError

METHODS = ("full", "lora", "qlora")
LOSSES = ("assistant", "full")
INDICATOR_TRAINING = ("tokens", "embeddings", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# Fields that TrainConfig owns; setting them again under ``sft:`` would be ambiguous.
_MAPPED = {"output_dir", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
           "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed",
           "logging_steps", "save_steps", "save_total_limit", "bf16", "fp16", "gradient_checkpointing",
           "activation_checkpointing",
           "use_cpu", "report_to", "disable_tqdm", "max_length", "assistant_only_loss",
           "completion_only_loss", "dataset_text_field", "chat_template_path"}


@dataclass
class TrainConfig(ConfigMixin):
    """Conditional instruction fine-tuning (METHOD §4): data, indicator, loss, adapter, optimisation."""

    # data and model
    model: str = field("embedded", help="base model: HF id, local directory, .gguf file or 'embedded'")
    dataset: str | None = field(None, metavar="FILE", help="training conversations: JSONL/JSON rows with "
                                "'messages' (ShareGPT 'conversations' are converted)")
    output_dir: str | None = field(None, metavar="DIR", help="where checkpoints and the trained model go")
    max_examples: int | None = field(None, help="use only the first N conversations (default: all)")
    chat_template: str | None = field(None, metavar="NAME|FILE", help="chat template for training and the "
                                      "saved tokenizer: 'zephyr' (the paper's), a .jinja file, or unset for "
                                      "the tokenizer's own")
    # indicator
    indicator: bool = field(True, help="keep the [IND] markers of the data; --no-indicator strips them "
                            "(the vanilla baseline of the same recipe)")
    add_indicator_token: bool | None = field(None, help="add [IND] as one special token (default: when the "
                                             "training data contains it)")
    allow_no_indicator: bool = field(False, help="train with the indicator on even when no user turn of the "
                                     "data carries [IND] (default: refuse; label it with `ctxaware indicate`)")
    indicator_training: str = field("tokens", choices=INDICATOR_TRAINING,
                                    help="under LoRA, how the [IND] embedding is trained: 'tokens' (only its "
                                    "rows), 'embeddings' (whole embedding matrices saved), 'none' (frozen, "
                                    "as the reference)")
    # loss
    loss: str = field("assistant", choices=LOSSES, help="'assistant': loss on assistant turns only (content "
                      "+ end-of-turn token); 'full': every token (the reference)")
    max_length: int = field(2048, help="truncate rendered conversations to this many tokens")
    drop_unsupervised: bool = field(False, help="drop conversations left with no supervised token instead "
                                    "of refusing to train")
    # method
    method: str = field("lora", choices=METHODS, help="full fine-tuning, LoRA, or QLoRA (4-bit, CUDA only)")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(16, help="LoRA alpha")
    lora_dropout: float = field(0.05, help="LoRA dropout")
    lora_target_modules: Any = field(DEFAULT_LORA_TARGETS, metavar="M1,M2",
                                     help="modules LoRA adapts (comma-separated, or 'all-linear')")
    # optimisation
    learning_rate: float = field(2e-4, help="peak learning rate")
    num_train_epochs: float = field(1.0, help="epochs (ignored when --max-steps > 0)")
    max_steps: int = field(-1, help="stop after this many optimiser steps (-1: run the epochs)")
    per_device_train_batch_size: int = field(4, help="conversations per device and micro-batch")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimiser step")
    lr_scheduler_type: str = field("cosine", help="learning-rate schedule (transformers name)")
    warmup_ratio: float = field(0.1, help="fraction of steps of linear warm-up")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    seed: int = field(42, help="random seed")
    dtype: str = field("auto", choices=DTYPES, help="weights dtype; 'auto': float32 on CPU, bfloat16 "
                       "(with bf16 mixed precision) on GPU")
    gradient_checkpointing: bool | None = field(None, help="recompute activations (default: on GPU only)")
    cpu: bool = field(False, help="train on CPU even when a GPU is visible")
    attn_implementation: str | None = field(None, metavar="NAME", help="attention implementation: sdpa, eager, "
                                            "flex_attention, flash_attention_2, ... (default: the model's own; "
                                            "the same option as every other command that loads a model)")
    logging_steps: int = field(10, help="log every N steps")
    save_steps: int = field(500, help="save a checkpoint every N steps")
    save_total_limit: int | None = field(2, help="keep at most N checkpoints")
    resume_from_checkpoint: str | None = field(None, metavar="DIR|latest|auto", help="resume from this "
                                               "checkpoint directory; 'latest': the newest complete one in "
                                               "--output-dir (one a kill left half-written is skipped); 'auto': "
                                               "that, or from scratch when there is none")
    report_to: str = field("none", help="experiment trackers (transformers names, comma-separated)")
    trust_remote_code: bool = field(False, help="allow model code from the Hub")
    progress: bool = field(True, help="show progress bars")
    # context-awareness monitor (ctxaware.training.callback)
    monitor: bool = field(False, help="probe context awareness while training (NIH recall per mode, template gap, "
                          "user-turn attention share), logged as context/... and appended to "
                          "context_awareness.jsonl in --output-dir (docs/training.md)")
    monitor_every: int | None = field(None, metavar="N", help="probe every N steps (default: save_steps, so "
                                      "probes fall on checkpoints)")
    monitor_modes: Any = field("raw+prefix,chat+prefix", metavar="M1,M2", help="NIH modes of the probe; the "
                               "template gap is the first raw mode minus the first chat mode")
    monitor_stop_gap: float | None = field(None, metavar="X", help="stop training, saving a checkpoint, when the "
                                           "template gap exceeds X at --monitor-stop-patience consecutive probes")
    monitor_stop_patience: int = field(2, metavar="K", help="consecutive probes over --monitor-stop-gap that stop")
    monitor_options: dict = field(default_factory=dict, cli=False,
                                  help="other MonitorConfig fields of the probe (lengths, depths, needle, ...)")
    sft: dict = field(default_factory=dict, cli=False,
                      help="any other trl.SFTConfig / TrainingArguments fields (e.g. deepspeed, fsdp)")

    def __post_init__(self) -> None:
        for name, allowed in (("method", METHODS), ("loss", LOSSES), ("dtype", DTYPES),
                              ("indicator_training", INDICATOR_TRAINING)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.max_length < 8:
            raise ConfigError(f"max_length must be at least 8 tokens, got {self.max_length}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be at least 1, got {self.max_examples}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError("nothing to train: set max_steps > 0 or num_train_epochs > 0")
        if not isinstance(self.sft, dict):
            raise ConfigError(f"sft must be a mapping of SFTConfig fields, got {type(self.sft).__name__}")
        clash = sorted(set(self.sft) & _MAPPED)
        if clash:
            raise ConfigError(f"set {', '.join(clash)} as top-level recipe option(s), not under 'sft:'")
        if self.monitor_stop_gap is not None and not self.monitor:
            raise ConfigError("--monitor-stop-gap needs --monitor")
        if self.monitor:
            self.monitor_config()  # validates the probe before any loading

    def monitor_config(self):
        """The :class:`~ctxaware.training.probe.MonitorConfig` of the ``monitor_*`` options."""
        from .probe import MonitorConfig

        if not isinstance(self.monitor_options, dict):
            raise ConfigError("monitor_options must be a mapping of MonitorConfig fields")
        over = {"every": self.monitor_every, "modes": self.monitor_modes, "stop_gap": self.monitor_stop_gap,
                "stop_patience": self.monitor_stop_patience}
        clash = sorted(set(self.monitor_options) & set(over))
        if clash:
            raise ConfigError(f"set {', '.join(clash)} as monitor_* option(s), not under monitor_options")
        return MonitorConfig.from_dict({**self.monitor_options, **over})

    @property
    def target_modules(self) -> list[str] | str:
        """``lora_target_modules`` as PEFT expects it (a list, or the string 'all-linear')."""
        value = self.lora_target_modules
        if isinstance(value, str):
            if value.strip() == "all-linear":
                return "all-linear"
            value = [v.strip() for v in value.split(",")]
        mods = [str(v) for v in value if str(v)]
        if not mods:
            raise ConfigError("lora_target_modules is empty; name modules such as q_proj,v_proj or 'all-linear'")
        return mods

    def require_paths(self) -> None:
        """Raise a one-line error when the dataset or output directory is not set."""
        if not self.dataset:
            raise ConfigError("no training data: set dataset in the recipe or pass --dataset FILE")
        if not self.output_dir:
            raise ConfigError("no output directory: set output_dir in the recipe or pass --output-dir DIR")
        from ..config import check_local_input

        check_local_input(self.dataset, "training data")  # before the model loads, not after

    def sft_config(self, *, on_gpu: bool, bf16_supported: bool = False):
        """The ``trl.SFTConfig`` for this recipe (imports trl).

        On CPU TRL's own defaults (bf16 autocast, gradient checkpointing) are turned off: training
        runs in float32 without checkpointing unless the recipe asks otherwise.
        """
        from trl import SFTConfig

        names = {f.name for f in dataclasses.fields(SFTConfig)}
        unknown = [k for k in self.sft if k not in names]
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else repr(k)
                     for k in unknown]
            raise ConfigError(f"unknown trl.SFTConfig option(s) under 'sft:': {', '.join(hints)}")
        mixed = on_gpu and self.dtype in ("auto", "bfloat16") and bf16_supported
        checkpointing = on_gpu if self.gradient_checkpointing is None else self.gradient_checkpointing
        kwargs: dict[str, Any] = dict(
            output_dir=str(self.output_dir), learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs, max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            lr_scheduler_type=self.lr_scheduler_type, warmup_steps=self.warmup_ratio,
            weight_decay=self.weight_decay, seed=self.seed, logging_steps=self.logging_steps,
            save_steps=self.save_steps, save_total_limit=self.save_total_limit,
            bf16=mixed, fp16=on_gpu and self.dtype == "float16",
            use_cpu=not on_gpu, report_to=[r for r in self.report_to.split(",") if r and r != "none"] or "none",
            disable_tqdm=not self.progress, max_length=self.max_length,
            # the data arrive tokenised, with labels; TRL only collates them
            dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        )
        # transformers >= 5.20 renamed gradient_checkpointing (TRL defaults it to True, even on CPU)
        kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = \
            checkpointing
        kwargs.update(self.sft)
        try:
            return SFTConfig(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid training arguments: {str(exc).splitlines()[0]}") from exc


def recipes_dir() -> Path:
    """The directory of the recipes shipped with ctxaware."""
    return Path(str(resources.files("ctxaware.training") / "recipes"))


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file names without ``.yaml``)."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """Path of the shipped recipe ``name`` (``smollm2-cpu``), with a did-you-mean error."""
    path = recipes_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        names = list_recipes()
        close = difflib.get_close_matches(name, names, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint}; shipped recipes: {', '.join(names)}")
    return path


def load_recipe(name_or_path: str | Path, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a shipped recipe name or a YAML/JSON file, with overrides applied."""
    p = Path(name_or_path)
    path = p if p.suffix in (".yaml", ".yml", ".json") or p.is_file() else recipe_path(str(name_or_path))
    values = read_config_file(path)
    values.update(overrides)
    return TrainConfig.from_dict(values)
