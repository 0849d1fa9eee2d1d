"""Configuration of one vanilla-vs-conditional fine-tuning comparison (``ctxaware sft-study``).

:class:`SftStudyConfig` holds the five stages' options: the data (and the subset taken), the probe
that scores it, the labelling rule, the shared training recipe of both arms, and their evaluation
(NIH modes, contextual QA, attention, optional MT-Bench). The defaults fit the embedded model on a
CPU: the ``smollm2-cpu`` recipe, a small NIH grid, 30 QA questions per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigMixin, field
from ..engines import (check_engine, engine_field, pipeline_parallel_size_field, tensor_parallel_size_field,
                       vllm_options_field)
from ..errors import ConfigError
from ..niah.config import canonical_mode, parse_mode
from ..study.config import QA_DATASETS, _qa_list

ARMS = ("vanilla", "conditional")
DEFAULT_FRACTION = 0.1


@dataclass
class SftStudyConfig(ConfigMixin):
    """Score, label, train a vanilla and a conditional arm from one base, evaluate both, report."""

    dataset: str | None = field(None, metavar="FILE", help="instruction data: JSONL/JSON rows with 'messages' "
                                "(ShareGPT 'conversations' converted) or a Hugging Face dataset name")
    out: str = field("runs/sft-study", metavar="DIR", help="output directory (rerun with the same one to resume)")
    model: str = field("embedded", help="base model of both arms: 'embedded', a Hugging Face id, a local "
                       "directory or a .gguf file")
    template_file: str | None = field(None, metavar="FILE|NAME", help="chat template for a base model without one "
                                      "(a .jinja file or 'zephyr'); both arms train and are evaluated with it")
    max_examples: int | None = field(None, metavar="N", help="use a seeded random sample of N conversations "
                                     "(default: all)")
    # scoring and labelling
    probe: str = field("embedded", help="probe model that scores the data (METHOD §3; default: the embedded "
                       "instruct model)")
    score_batch_size: int = field(4, help="conversations per probe forward pass")
    score_max_length: int = field(1024, help="score only turns that fit in this many probe tokens")
    target_fraction: float | None = field(None, metavar="F", help="label the top F (0-1) of scored turns "
                                          f"(default: {DEFAULT_FRACTION} when no --threshold is given)")
    threshold: float | None = field(None, metavar="BETA", help="label a turn whose response scores strictly "
                                    "above BETA instead (the paper's 0.6 was set on its own probe)")
    # training (both arms)
    recipe: str = field("smollm2-cpu", metavar="NAME|FILE", help="training recipe shared by both arms (a shipped "
                        "name or a YAML file of ctxaware train options)")
    lora: bool | None = field(None, help="--lora / --no-lora: LoRA or full fine-tuning (default: the recipe's)")
    max_steps: int | None = field(None, help="optimiser steps per arm (default: the recipe's)")
    seed: int | None = field(None, help="training seed of both arms and of the data order (default: the recipe's)")
    train_args: dict = field(default_factory=dict, cli=False,
                             help="other ctxaware train options applied to both arms (e.g. learning_rate)")
    monitor: bool = field(True, help="probe context awareness of both arms while they train (ctxaware train "
                          "--monitor): the report draws their template gap and user share against the step")
    monitor_every: int | None = field(None, metavar="N", help="probe every N training steps (default: the "
                                      "recipe's save_steps)")
    # evaluation (both arms)
    modes: Any = field("chat+prefix,chat", metavar="M1,M2", help="NIH modes of both arms; the conditional arm "
                       "runs each with +ind (the paper's evaluation) and without (the ablation)")
    needle: str = field("SF", metavar="NEEDLE", help="NIH needle")
    haystack: str = field("builtin", metavar="SOURCE", help="NIH haystack: builtin, paul_graham or .txt file/dir")
    lengths: Any = field("1000,2000,3000", metavar="L1,L2", help="NIH context lengths in tokens")
    depths: Any = field("0,25,50,75,100", metavar="D1,D2", help="NIH needle depths in percent")
    max_new_tokens: int = field(40, help="greedy decoding budget per NIH answer")
    attention_length: int = field(2000, help="context length of the NIH prompts whose attention by role is measured")
    attention_depths: Any = field("0,50,100", metavar="D1,D2", help="needle depths of those prompts")
    qa: Any = field(None, metavar="SETS", help="contextual QA datasets: squad,quac,drop (default: none)")
    qa_limit: int = field(30, help="questions per QA dataset and variant")
    data_dir: str | None = field(None, metavar="DIR", help="local QA data folder (see docs/eval.md)")
    mtbench_judge_url: str | None = field(None, metavar="URL", help="OpenAI-compatible judge endpoint: run "
                                          "MT-Bench on both arms (default: no MT-Bench)")
    mtbench_judge_model: str | None = field(None, metavar="NAME", help="judge model name")
    mtbench_limit: int | None = field(None, metavar="N", help="MT-Bench questions per arm (default: all 80)")
    mtbench_max_new_tokens: int = field(512, help="MT-Bench decoding budget per answer turn")
    mtbench_data_dir: str | None = field(None, metavar="DIR", help="MT-Bench data folder (FastChat layout)")
    batch_size: int = field(8, help="NIH cells decoded together")
    dtype: str = field("float32", choices=("float32", "bfloat16", "float16", "auto"),
                       help="dtype of the probe and of the evaluated models")
    device: str | None = field(None, help="torch device of scoring and evaluation (default: cuda, mps, else cpu)")
    engine: str = engine_field()
    tensor_parallel_size: int = tensor_parallel_size_field()
    pipeline_parallel_size: int = pipeline_parallel_size_field()
    vllm_options: Any = vllm_options_field()
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self) -> None:
        check_engine(self)  # the evaluation's engine: scoring and training stay on transformers
        if self.target_fraction is not None and self.threshold is not None:
            raise ConfigError("pass either --target-fraction or --threshold, not both")
        if self.target_fraction is not None and not 0.0 < float(self.target_fraction) <= 1.0:
            raise ConfigError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be at least 1, got {self.max_examples}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")
        for name in ("score_batch_size", "qa_limit", "batch_size", "max_new_tokens", "mtbench_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not isinstance(self.train_args, dict):
            raise ConfigError("train_args must be a mapping of ctxaware train options")
        clash = sorted(set(self.train_args) & {"indicator", "add_indicator_token", "output_dir", "dataset", "model"})
        if clash:
            raise ConfigError(f"train_args may not set {', '.join(clash)}: sft-study sets them per arm")
        self.qa = _qa_list(self.qa)
        modes = [m.strip() for m in self.modes.split(",")] if isinstance(self.modes, str) else list(self.modes)
        modes = [canonical_mode(m) for m in modes if m]
        bad = [m for m in modes if parse_mode(m)[1] & {"ind", "steer"}]
        if not modes or bad:
            raise ConfigError(f"modes: give base modes without +ind or +steer (the conditional arm adds +ind "
                              f"itself), got {self.modes!r}")
        self.modes = list(dict.fromkeys(modes))
        if self.mtbench_judge_model and not self.mtbench_judge_url:
            raise ConfigError("--mtbench-judge-model needs --mtbench-judge-url")

    @property
    def fraction(self) -> float | None:
        """The target fraction in force (None under a threshold)."""
        if self.threshold is not None:
            return None
        return DEFAULT_FRACTION if self.target_fraction is None else float(self.target_fraction)

    def engine_options(self) -> dict[str, Any]:
        """The evaluation's engine fields, as the study and MT-Bench parts take them."""
        return {"engine": self.engine, "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size, "vllm_options": self.vllm_options}

    def arm_modes(self, arm: str) -> list[str]:
        """NIH modes of an arm: the base modes, and for the conditional arm each with +ind first."""
        if arm == "vanilla":
            return list(self.modes)
        return [canonical_mode(m + "+ind") for m in self.modes] + list(self.modes)

    def qa_variants(self, arm: str) -> list[str]:
        """QA variants of an arm (see :mod:`ctxaware.study.qa`)."""
        return ["chat"] if arm == "vanilla" else ["chat+ind", "chat"]


__all__ = ["ARMS", "QA_DATASETS", "SftStudyConfig"]
