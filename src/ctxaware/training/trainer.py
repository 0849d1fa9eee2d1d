"""Building and running the conditional SFT trainer on TRL's ``SFTTrainer`` and PEFT.

``build_trainer(config)`` loads the model, sets the chat template, adds ``[IND]`` as a special
token when needed, tokenises the data with assistant-only labels, wraps the model with LoRA/QLoRA
and returns a ready ``SFTTrainer``; ``train(config)`` runs it and saves a directory that
``ctxaware.models.load_model`` reloads (the full model, or the adapter plus the tokenizer).

Under LoRA the ``[IND]`` row is trained with PEFT's trainable tokens. TRL's fused LM head reads
``lm_head.weight`` and ``lm_head.bias``; PEFT's ``TrainableTokensWrapper`` (which wraps the tied
``lm_head`` too) forwards ``weight`` to the merged weights but has no ``bias``, so training fails
with an ``AttributeError``. :func:`patch_trainable_tokens_bias` gives each wrapper the ``bias`` of
the layer it wraps (a plain attribute, not a registered parameter, so state dicts are unchanged).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError, MissingDependencyError, require
from ..fsio import fsync_dir, fsync_tree
from .checkpoints import resume_checkpoint
from .conditions import (add_indicator_token, count_indicated, count_indicated_turns, indicator_token_id,
                         prepare_conversations)
from .config import TrainConfig
from .data import TrainingData, build_dataset, end_of_turn_ids, load_conversations, resolve_chat_template

logger = logging.getLogger(__name__)

CONFIG_FILE = "ctxaware_train.yaml"


@dataclass
class TrainSetup:
    """Everything :func:`build_trainer` prepared, for inspection or for running it."""

    trainer: Any
    config: TrainConfig
    tokenizer: Any
    data: TrainingData
    indicator_id: int | None
    num_indicated: int
    base_ref: str
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`train` produced: the saved directory and the final training metrics."""

    output_dir: str
    metrics: dict[str, float]
    indicator_id: int | None
    adapter: bool
    data: TrainingData
    log_history: list[dict[str, Any]]
    resumed_from: str | None = None  # the checkpoint training resumed from, if any
    monitor: dict[str, Any] | None = None  # the context-awareness monitor: file, probes, seconds, stopped_at


def _on_gpu(config: TrainConfig) -> tuple[bool, bool]:
    import torch

    gpu = torch.cuda.is_available() and not config.cpu
    return gpu, bool(gpu and torch.cuda.is_bf16_supported())


def _weights_dtype(config: TrainConfig, on_gpu: bool) -> str:
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if on_gpu else "float32"


def _base_ref(name: str) -> str:
    """How an adapter names its base: the user's own name, or an absolute path for local files."""
    from ..models import DEFAULT_MODEL, EMBEDDED_NAME

    if name in (DEFAULT_MODEL, EMBEDDED_NAME):
        return DEFAULT_MODEL
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def _load(config: TrainConfig, on_gpu: bool):
    from ..models import load_model, load_tokenizer, resolve_model_path

    dtype = _weights_dtype(config, on_gpu)
    if config.method != "qlora":
        # loaded on the CPU: the Trainer (or accelerate, one device per process) places it
        return tuple(load_model(config.model, dtype=dtype, device="cpu", attn_implementation=config.attn_implementation,
                                trust_remote_code=config.trust_remote_code))
    if not on_gpu:
        raise ConfigError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); on CPU use method: lora")
    require("bitsandbytes", "qlora")
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    path = resolve_model_path(config.model)
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 trust_remote_code=config.trust_remote_code, **extra)
    checkpointing = on_gpu if config.gradient_checkpointing is None else config.gradient_checkpointing
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return model, load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ConfigError(f"cannot find the embedding module of {type(model).__name__}")  # pragma: no cover


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def peft_config_for(config: TrainConfig, model, indicator_id: int | None):
    """The ``peft.LoraConfig`` of the recipe, making the ``[IND]`` row trainable as asked."""
    peft = require("peft", "train")
    kwargs: dict[str, Any] = dict(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules=config.target_modules, task_type="CAUSAL_LM")
    if indicator_id is not None and config.indicator_training != "none":
        inp = _module_name(model, model.get_input_embeddings())
        out_mod = model.get_output_embeddings()
        untied_out = _module_name(model, out_mod) if out_mod is not None and not _tied(model) else None
        if config.indicator_training == "tokens":
            indices = {inp: [indicator_id]}
            if untied_out and config.loss == "full":  # [IND] is a target only under full-sequence loss
                indices[untied_out] = [indicator_id]
            kwargs["trainable_token_indices"] = indices
        else:
            kwargs["modules_to_save"] = [inp] + ([untied_out] if untied_out else [])
            kwargs["ensure_weight_tying"] = _tied(model)
    return peft.LoraConfig(**kwargs)


def patch_trainable_tokens_bias(model) -> int:
    """Give PEFT ``TrainableTokensWrapper`` modules the ``bias`` TRL's fused LM head reads; returns the count."""
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:  # pragma: no cover - other PEFT layouts
        return 0
    patched = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            base = module.original_module
            object.__setattr__(module, "bias", getattr(base, "bias", None))
            patched += 1
    return patched


def _trainer_class():
    """``trl.SFTTrainer`` whose checkpoints never copy the whole embedding matrices into an adapter.

    PEFT saves full embedding layers with an adapter when the vocabulary grew (``[IND]``); the
    ``[IND]`` row already travels in the adapter (trainable tokens or modules to save), so the
    copy only costs disk (about 2 GB per checkpoint for Llama-3-8B).
    """
    from trl import SFTTrainer

    class CtxawareSFTTrainer(SFTTrainer):
        _ctxaware_skip_tokenizer = False  # save_trained writes the tokenizer itself, atomically

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if not getattr(model, "peft_config", None):
                if not self._ctxaware_skip_tokenizer:
                    return super()._save(output_dir, state_dict)
                tokenizer, self.processing_class = self.processing_class, None
                try:
                    return super()._save(output_dir, state_dict)
                finally:
                    self.processing_class = tokenizer
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
                return None
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
            if state_dict is None and model is not self.model:
                state_dict = self.model.state_dict()
            model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save,
                                  save_embedding_layers=False)
            if self.args.should_save and self.processing_class is not None and not self._ctxaware_skip_tokenizer:
                self.processing_class.save_pretrained(output_dir)
            return None

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:  # make the finished checkpoint durable before training goes on
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

                run_dir = Path(self._get_output_dir(trial=trial))
                fsync_tree(run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    return CtxawareSFTTrainer


def build_trainer(config: TrainConfig, *, model=None, tokenizer=None,
                  conversations: list[list[dict[str, Any]]] | None = None) -> TrainSetup:
    """Prepare the model, tokenizer, data and ``trl.SFTTrainer`` described by ``config``.

    ``model``/``tokenizer``/``conversations`` may be given directly (tests, notebooks); otherwise
    they come from ``config.model`` and ``config.dataset``.
    """
    try:
        trainer_cls = _trainer_class()
    except ImportError as exc:
        raise MissingDependencyError("training needs trl, peft and accelerate; run: "
                                     "pip install 'ctxaware[train]'") from exc
    if config.output_dir is None or (conversations is None and not config.dataset):
        config.require_paths()
    on_gpu, bf16_ok = _on_gpu(config)
    args = config.sft_config(on_gpu=on_gpu, bf16_supported=bf16_ok)  # validates `sft:` before any loading
    if model is None or tokenizer is None:
        model, tokenizer = _load(config, on_gpu)
    template = resolve_chat_template(config.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise ConfigError(f"{config.model} has no chat template; set chat_template: zephyr (the paper's) "
                          "or a .jinja file")
    if conversations is None:
        conversations = load_conversations(str(config.dataset), max_examples=config.max_examples)
    elif config.max_examples:
        conversations = conversations[: config.max_examples]
    num_indicated = count_indicated(conversations)
    if config.indicator and num_indicated == 0 and not config.allow_no_indicator:
        marked, turns = count_indicated_turns(conversations)
        where = config.dataset or "the training data"
        raise InputError(f"{where}: {marked} of {turns} user turns carry [IND], so conditional training would "
                         "be vanilla; label it (ctxaware indicate --target-fraction 0.1), pass --no-indicator "
                         "for the vanilla baseline, or --allow-no-indicator to train anyway")
    conversations = prepare_conversations(conversations, indicator=config.indicator)
    want_token = config.add_indicator_token
    if want_token is None:
        want_token = config.indicator and num_indicated > 0
    indicator_id = add_indicator_token(model, tokenizer) if want_token else indicator_token_id(tokenizer)
    logger.info("%d of %d conversations carry [IND] (indicator %s, token id %s)", num_indicated,
                len(conversations), "kept" if config.indicator else "stripped", indicator_id)
    data = build_dataset(tokenizer, conversations, loss=config.loss, max_length=config.max_length,
                         stop_ids=end_of_turn_ids(tokenizer, model), drop_unsupervised=config.drop_unsupervised,
                         progress=config.progress)
    logger.info("training data: %s", data.summary())
    peft_config = peft_config_for(config, model, indicator_id) if config.method in ("lora", "qlora") else None
    trainer = trainer_cls(model=model, args=args, train_dataset=data.dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    patch_trainable_tokens_bias(trainer.model)
    extras: dict[str, Any] = {}
    if config.monitor:
        from .callback import ContextAwarenessCallback

        extras["monitor"] = ContextAwarenessCallback(tokenizer, config.monitor_config()).attach(trainer)
    if not config.progress:  # without tqdm, transformers prints every log dict to stdout
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return TrainSetup(trainer=trainer, config=config, tokenizer=tokenizer, data=data, indicator_id=indicator_id,
                      num_indicated=num_indicated, base_ref=_base_ref(config.model), extras=extras)


def _is_fsdp(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def _save_tokenizer_atomically(tokenizer, out: Path) -> None:
    """Write the tokenizer files into a temporary directory next to ``out``, fsync, then rename each in."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out))
    try:
        tokenizer.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(f, out / f.name)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_in(stage: Path, out: Path) -> None:
    """fsync the files written under ``stage`` and rename each into the same place under ``out``."""
    fsync_tree(stage)
    for d, _, files in os.walk(stage):
        rel = Path(d).relative_to(stage)
        (out / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            os.replace(Path(d) / name, out / rel / name)
        fsync_dir(out / rel)
    shutil.rmtree(stage, ignore_errors=True)


def save_trained(setup: TrainSetup, output_dir: str | os.PathLike | None = None) -> str:
    """Save the trained model (or adapter), the tokenizer with ``[IND]``, and the recipe used.

    Weights go through ``Trainer.save_model`` into a staging directory inside ``output_dir``, are
    fsynced and renamed into place, so a kill while saving never leaves a torn weights file. Under
    FSDP (whatever its checkpoint state-dict type) the full state dict is gathered from every
    rank, under DeepSpeed ZeRO-3 the 16-bit
    weights are consolidated, and only the process with ``args.should_save`` writes. Every
    process must call this (the gathers are collective). The tokenizer and ``ctxaware_train.yaml``
    are written by that process only, atomically; all processes return once the files exist.
    """
    trainer = setup.trainer
    out = Path(output_dir or str(setup.config.output_dir))
    main = bool(trainer.args.should_save)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    model.config.use_cache = True
    for cfg in (getattr(model, "peft_config", None) or {}).values():
        cfg.base_model_name_or_path = setup.base_ref
    if _is_fsdp(trainer):  # a sharded checkpoint type would make save_model write nothing
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    stage = out / ".ctxaware-save.tmp"  # the same path on every process (save_model is collective)
    if main:
        shutil.rmtree(stage, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer._ctxaware_skip_tokenizer = True
    try:
        trainer.save_model(str(stage))
    finally:
        trainer._ctxaware_skip_tokenizer = False
    trainer.accelerator.wait_for_everyone()
    if main:
        _move_in(stage, out)  # weights fsynced, then renamed over the previous ones file by file
        _save_tokenizer_atomically(setup.tokenizer, out)
        setup.config.save(out / CONFIG_FILE)
    trainer.accelerator.wait_for_everyone()
    return str(out)


def train(config: TrainConfig, **build_kwargs: Any) -> TrainResult:
    """Build the trainer for ``config``, train, save to ``config.output_dir``, and report."""
    resume = resume_checkpoint(config)
    setup = build_trainer(config, **build_kwargs)
    t0 = time.perf_counter()
    output = setup.trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    out = save_trained(setup)
    cb = setup.extras.get("monitor")
    monitor = None if cb is None else {
        "file": str(cb.path), "probes": len(cb.history), "seconds": round(cb.seconds, 2),
        "train_seconds": round(seconds, 2), "stopped_at": cb.stopped_at,
        "last": cb.history[-1] if cb.history else None}
    metrics = {k: float(v) for k, v in (output.metrics or {}).items() if isinstance(v, (int, float))}
    metrics["global_step"] = float(output.global_step)
    return TrainResult(output_dir=out, metrics=metrics, indicator_id=setup.indicator_id,
                       adapter=bool(getattr(setup.trainer.model, "peft_config", None)), data=setup.data,
                       log_history=list(setup.trainer.state.log_history), resumed_from=resume, monitor=monitor)
