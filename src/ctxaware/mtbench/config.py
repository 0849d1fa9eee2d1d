"""Configuration of an MT-Bench run (``ctxaware mtbench``): :class:`MtBenchConfig` and the condition name.

The *condition* is everything about how the answers were produced beyond the model: chat
template (own, a file, or none), ``[IND]`` on every user turn, steering (alpha, heads, ...), a
PEFT adapter and a free label. Its canonical name (e.g. ``chat+ind+steer(alpha=0.9,heads=all)``)
goes into every answer and judgment key, so one directory holds several conditions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigMixin, attn_implementation_field, device_map_field, field, trust_remote_code_field
from ..engines import (check_engine, engine_field, engine_identity, pipeline_parallel_size_field, tensor_parallel_size_field,
                       vllm_options_field)
from ..errors import ConfigError, InputFileNotFoundError

#: fields that do not change answers or judgments (they may differ between a run and its resumption)
RUNTIME_FIELDS = ("out", "progress", "batch_size", "judge_concurrency", "judge_retries", "judge_timeout",
                  "judge_backoff", "judge_api_key_env", "rejudge_unjudged", "device", "limit", "tensor_parallel_size",
                  "pipeline_parallel_size")


@dataclass
class MtBenchConfig(ConfigMixin):
    """One MT-Bench run: model and condition, data, generation, and the OpenAI-compatible judge."""

    model: str = field("embedded", help="model: 'embedded', a Hugging Face id, a local directory or a .gguf file")
    out: str = field("runs/mtbench", metavar="DIR", help="output directory (answers.jsonl, judgments.jsonl, "
                                                         "summary.json); rerun with the same one to resume")
    data_dir: str | None = field(None, metavar="DIR", help="MT-Bench data in FastChat's llm_judge/data/mt_bench "
                                 "layout (question.jsonl, reference_answer/gpt-4.jsonl, judge_prompts.jsonl here or "
                                 "one level up) (default: downloaded once into the user cache)")
    questions: str | None = field(None, metavar="FILE", help="a question.jsonl to use instead of the data "
                                                             "directory's (same layout)")
    limit: int | None = field(None, metavar="N", help="judge only N questions, taken one per category in turn "
                                                      "(default: all 80)")
    max_new_tokens: int = field(1024, help="greedy decoding budget per answer turn (FastChat's default)")
    batch_size: int = field(8, help="questions generated together (left-padded batches)")
    judge_base_url: str | None = field(None, metavar="URL", help="OpenAI-compatible endpoint of the judge, e.g. "
                                       "https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (required)")
    judge_model: str | None = field(None, metavar="NAME", help="judge model name, e.g. gpt-4 (default: the "
                                    "endpoint's only model, when it lists one)")
    judge_api_key_env: str = field("OPENAI_API_KEY", metavar="VAR", help="environment variable holding the "
                                   "judge's API key (no key is sent when it is unset)")
    judge_concurrency: int = field(8, help="judge calls in flight at once")
    judge_retries: int = field(3, help="tries after the first on an HTTP error, a timeout or a reply without a "
                                       "[[rating]]; then the turn is recorded unjudged (score null)")
    judge_timeout: float = field(120.0, help="seconds per judge call")
    judge_backoff: float = field(1.0, help="seconds before the first retry, doubled at each retry (at most 60)")
    judge_max_tokens: int = field(2048, help="max_tokens of each judge reply (FastChat's 2048; 0 = not sent)")
    rejudge_unjudged: bool = field(False, help="judge again the turns an earlier run left unjudged")
    indicator: bool = field(False, help="append [IND] to every user turn (the conditional-SFT indicator)")
    steering: str | None = field(None, metavar="FILE", help="steering file (ctxaware calibrate); --alpha/--heads "
                                                            "override its fields")
    alpha: float | None = field(None, help="steer toward the user's turns with this alpha in (0, 1] (steering is "
                                           "off unless --steering, --alpha or --heads is given; default 0.95)")
    heads: str | None = field(None, metavar="SPEC", help="steered heads: all, layers '0-11', or '3:0,5;7:all'")
    template_file: str | None = field(None, metavar="FILE", help="a Jinja chat template instead of the tokenizer's")
    template: bool = field(True, help="render with a chat template; --no-template joins the turns by newlines "
                                      "instead (base models)")
    adapter: str | None = field(None, metavar="DIR", help="a PEFT adapter directory (ctxaware train) to answer "
                                                          "with; its base model is the one it names")
    label: str | None = field(None, help="a name added to the condition (e.g. vanilla, conditional)")
    dtype: str = field("auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="model dtype; auto = bfloat16 where the hardware computes it fast, else float32")
    device: str | None = field(None, help="torch device (default: cuda, then mps, when present; else cpu)")
    device_map: str | None = device_map_field()
    attn_implementation: str | None = attn_implementation_field()
    trust_remote_code: bool = trust_remote_code_field()
    engine: str = engine_field()
    tensor_parallel_size: int = tensor_parallel_size_field()
    pipeline_parallel_size: int = pipeline_parallel_size_field()
    vllm_options: Any = vllm_options_field()
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "judge_concurrency"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and int(self.limit) < 1:
            raise ConfigError(f"limit must be a positive number of questions, got {self.limit}")
        if int(self.judge_retries) < 0 or int(self.judge_max_tokens) < 0:
            raise ConfigError("judge_retries and judge_max_tokens must be >= 0")
        if not float(self.judge_timeout) > 0 or float(self.judge_backoff) < 0:
            raise ConfigError(f"judge_timeout must be > 0 and judge_backoff >= 0, got {self.judge_timeout}, "
                              f"{self.judge_backoff}")
        if self.alpha is not None and not 0.0 < float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha}")
        if not self.template and self.template_file:
            raise ConfigError("pass either --template-file or --no-template, not both")
        for name in ("steering", "template_file", "questions"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise InputFileNotFoundError(f"{name.replace('_', '-')} {value!r} not found")
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise InputFileNotFoundError(f"adapter {self.adapter!r} is not a PEFT adapter directory (no "
                                         "adapter_config.json)")
        self.steering_config()  # the steering file's content and --heads, checked now rather than after loading
        check_engine(self)

    def require_judge(self) -> None:
        """One-line error when no judge endpoint is configured."""
        if not self.judge_base_url:
            raise ConfigError("no judge: pass --judge-base-url URL (an OpenAI-compatible endpoint such as "
                              "https://api.openai.com/v1, or http://127.0.0.1:8000/v1 of ctxaware serve) and "
                              "--judge-model NAME")

    @property
    def steered(self) -> bool:
        return bool(self.steering) or self.alpha is not None or self.heads is not None

    def steering_config(self) -> Any:
        """The :class:`SteeringConfig` of the run, or None when steering was not asked for."""
        if not self.steered:
            return None
        from ..steering import SteeringConfig

        base = {}
        if self.steering:
            from ..steering.file import load_steering_file

            base = load_steering_file(self.steering).to_dict()
        if self.alpha is not None:
            base["alpha"] = float(self.alpha)
        if self.heads is not None:
            base["heads"] = self.heads
        return SteeringConfig.from_dict(base)

    def template_text(self) -> str | None:
        return Path(self.template_file).read_text(encoding="utf-8") if self.template_file else None

    def condition(self) -> dict[str, Any]:
        """The condition as data (what goes into answer records)."""
        steer = self.steering_config()
        tpl = None
        if self.template_file:
            tpl = f"{Path(self.template_file).name}:{hashlib.sha256(self.template_text().encode()).hexdigest()[:8]}"
        return {"template": "none" if not self.template else (tpl or "own"), "indicator": bool(self.indicator),
                "steering": steering_tag(steer) if steer is not None and steer.active else None,
                "adapter": _adapter_tag(self.adapter) if self.adapter else None, "label": self.label,
                **engine_identity(self)}


def _adapter_tag(adapter: str) -> str:
    """``NAME@DIGEST``: the folder name for people, the content digest so that two adapters saved under the same
    folder name (sft-study's ``vanilla/model`` and ``conditional/model``) are two conditions."""
    from ..identity import dir_digest

    return f"{Path(adapter).name}@{dir_digest(adapter)[:8]}"


def steering_tag(steer: Any) -> str:
    """``alpha=0.9,heads=all`` plus every other steering field that differs from its default."""
    from ..steering import SteeringConfig

    defaults = SteeringConfig().to_dict()
    d = steer.to_dict()
    parts = [f"alpha={float(d['alpha']):g}", f"heads={d['heads']}"]
    parts += [f"{k}={v}" for k, v in d.items() if k not in ("alpha", "heads") and v != defaults.get(k)]
    return ",".join(parts)


def condition_name(condition: dict[str, Any]) -> str:
    """Canonical name of a condition dict: ``chat`` / ``raw`` / ``template=F``, then ``+ind``,
    ``+steer(...)``, ``+adapter=NAME@DIGEST``, ``+label=X``, ``+engine=vllm``, ``+dtype=D`` (answers of the transformers engine carry
    no engine part, so vLLM answers never reuse theirs)."""
    tpl = condition.get("template", "own")
    parts = ["chat" if tpl == "own" else "raw" if tpl == "none" else f"template={tpl}"]
    if condition.get("indicator"):
        parts.append("ind")
    if condition.get("steering"):
        parts.append(f"steer({condition['steering']})")
    if condition.get("adapter"):
        parts.append(f"adapter={condition['adapter']}")
    if condition.get("label"):
        parts.append(f"label={condition['label']}")
    if condition.get("engine", "transformers") != "transformers":
        parts.append(f"engine={condition['engine']}")
    if condition.get("dtype"):  # answers of two dtypes are two conditions (two report rows), never one
        parts.append(f"dtype={condition['dtype']}")
    return "+".join(parts)
