"""Configuration of one study (``ctxaware study``): :class:`StudyConfig`.

The default grid is chosen for the embedded model on 2 CPU cores (see docs/study.md): lengths
1000, 3000, 5000 × depths 0, 25, 50, 75, 100 in the four modes of the paper's comparison —
``raw+prefix`` (no template), ``chat+prefix`` (template), ``chat+prefix+steer`` (template +
steering), ``chat`` (template, no response prefix). 7k tokens is left out: every mode loses the
needle there at depths ≤ 50 % (a length limit of a 135M model, not the template's effect) and it
takes about 45 % of the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigMixin, attn_implementation_field, device_map_field, field, trust_remote_code_field
from ..engines import (check_engine, engine_field, pipeline_parallel_size_field, tensor_parallel_size_field,
                       vllm_options_field)
from ..errors import ConfigError
from ..niah.config import NiahConfig, canonical_mode

STUDY_MODES = "raw+prefix,chat+prefix,chat+prefix+steer,chat"
QA_DATASETS = ("squad", "quac", "drop")


@dataclass
class StudyConfig(ConfigMixin):
    """One diagnosis of a chat model: NIH modes, attention by role, optional contextual QA."""

    model: str = field("embedded", help="model: 'embedded', a Hugging Face id, a local directory or a .gguf file")
    out: str = field("runs/study", metavar="DIR", help="output directory (rerun with the same one to resume)")
    needle: str = field("SF", metavar="NEEDLE", help="NIH needle: SF, pizza, ... or a YAML/JSON needle file "
                                                     "(also the needle of the attention part)")
    task: Any = field(None, metavar="T1,T2,...",
                      help="NIH tasks, comma-separated: multi-key, multi-value, multi-query, literal-free, any "
                           "needle name or file; each runs in every mode into its own DIR/niah-<task>/ "
                           "(default: only --needle, into DIR/niah)")
    phrasings: Any = field("all", metavar="I1,I2,...|all",
                           help="question phrasings of each needle/task to run (0 = the needle's own question; every "
                                "built-in has three): phrasing i > 0 of a task T goes to DIR/niah-T_q<i>/ and its "
                                "records are task T@q<i>; the report gives verdicts per phrasing and pooled")
    effective_threshold: float = field(0.85, help="mean recall a length must reach for the NIH effective length")
    target_effect: float | None = field(None, metavar="D",
                                        help="size the NIH grid to detect a difference D (0-1) in the share of cells "
                                             "found between two modes (exact McNemar, 5 %% level, 80 %% power): depths "
                                             "are spread evenly until lengths x depths reach the cells needed, or the "
                                             "study says how many it would need (default: the grid as given)")
    shard: str | None = field(None, metavar="I/N",
                              help="run only shard I of N of every NIH grid (see ctxaware niah --shard) and stop; "
                                   "a later run without --shard merges the shards and runs the other parts")
    haystack: str = field("builtin", metavar="SOURCE", help="NIH haystack: builtin, paul_graham or .txt file/dir")
    lengths: Any = field("1000,3000,5000", metavar="L1,L2,...", help="NIH context lengths in tokens")
    depths: Any = field("0,25,50,75,100", metavar="D1,D2,...", help="NIH needle depths in percent")
    modes: Any = field(STUDY_MODES, metavar="M1,M2,...", help="NIH modes (see ctxaware niah --help)")
    steering: str | None = field(None, metavar="FILE",
                                 help="steering file (ctxaware calibrate) for +steer modes and steered QA; "
                                      "replaces --alpha/--heads (default: DIR/steering.yaml when it exists)")
    alpha: float = field(0.9, help="steering strength of +steer modes when no --steering file is given, in (0, 1]")
    heads: str = field("all", metavar="SPEC", help="steered heads when no --steering file is given")
    max_new_tokens: int = field(40, help="greedy decoding budget per NIH answer")
    attention_length: int = field(3000, help="context length of the NIH prompts whose attention by role is measured")
    attention_depths: Any = field("0,50,100", metavar="D1,D2,...",
                                  help="needle depths of those prompts (one prompt per depth, each with and "
                                       "without the template)")
    qa: Any = field(None, metavar="SETS", help="contextual QA datasets to evaluate: squad,quac,drop (default: none)")
    qa_limit: int = field(50, help="questions per QA dataset and variant")
    data_dir: str | None = field(None, metavar="DIR", help="local QA data folder (see docs/eval.md)")
    multidoc: str | None = field(None, metavar="PATH",
                                 help="SQuAD-format data for multi-document QA by gold position (ctxaware multidoc) "
                                      "into DIR/multidoc, in raw+prefix, chat+prefix, chat and the study's steering "
                                      "(whole turn and documents only) (default: none)")
    multidoc_questions: int = field(20, help="multi-document QA questions")
    multidoc_k: str = field("4", metavar="K1,K2,...", help="multi-document QA distractors per prompt")
    mtbench_judge_url: str | None = field(None, metavar="URL",
                                          help="run MT-Bench into DIR/mtbench, judged by this OpenAI-compatible "
                                               "endpoint: plain chat, and steered too when the study steers "
                                               "(default: no MT-Bench; see docs/mtbench.md)")
    mtbench_judge_model: str | None = field(None, metavar="NAME", help="MT-Bench judge model (default: the "
                                                                       "endpoint's only model)")
    mtbench_limit: int | None = field(None, metavar="N", help="MT-Bench questions, one per category in turn "
                                                              "(default: all 80)")
    mtbench_data_dir: str | None = field(None, metavar="DIR", help="MT-Bench data folder, FastChat's layout "
                                                                   "(default: downloaded once into the user cache)")
    mtbench_max_new_tokens: int = field(1024, help="MT-Bench decoding budget per answer turn")
    batch_size: int = field(8, help="NIH cells decoded together")
    dtype: str = field("auto", choices=("float32", "bfloat16", "float16", "auto"), help="model dtype: auto = bfloat16 where the hardware computes it fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else float32; float32 for exact comparisons")
    device: str | None = field(None, help="torch device (default: cuda, then mps, else cpu)")
    device_map: str | None = device_map_field()
    attn_implementation: str | None = attn_implementation_field()
    trust_remote_code: bool = trust_remote_code_field()
    engine: str = engine_field()
    tensor_parallel_size: int = tensor_parallel_size_field()
    pipeline_parallel_size: int = pipeline_parallel_size_field()
    vllm_options: Any = vllm_options_field()
    report: bool = field(True, help="write DIR/report.html at the end")
    overwrite: bool = field(False, help="discard NIH results in DIR/niah of a different study")
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self) -> None:
        check_engine(self)
        self.qa = _qa_list(self.qa)
        if self.qa_limit < 1:
            raise ConfigError(f"qa_limit must be >= 1, got {self.qa_limit}")
        if self.mtbench_judge_url:
            self.mtbench_configs()  # validates the MT-Bench options before anything runs
        if self.attention_length < 1:
            raise ConfigError(f"attention_length must be >= 1, got {self.attention_length}")
        depths = [d.strip() for d in str(self.attention_depths).split(",") if d.strip()] \
            if isinstance(self.attention_depths, str) else list(self.attention_depths or [])
        try:
            self.attention_depths = [float(d) for d in depths]
        except ValueError:
            raise ConfigError(f"attention_depths must be numbers, got {self.attention_depths!r}") from None
        if not self.attention_depths or any(not 0 <= d <= 100 for d in self.attention_depths):
            raise ConfigError(f"attention_depths must be percentages in [0, 100], got {self.attention_depths}")
        if not self.steering and (Path(self.out) / "steering.yaml").is_file():
            self.steering = str(Path(self.out) / "steering.yaml")  # ctxaware calibrate --out DIR wrote one
        self.task = _task_list(self.task)
        if self.multidoc:
            self.multidoc_config()  # validates k, questions before anything runs
        if self.target_effect is not None:
            self._size_grid()
        from ..niah.needles import load_needle

        for cfg in self.niah_configs().values():  # validates grid, modes, α, heads now rather than after loading
            load_needle(cfg.needle)  # and the task files: one line naming the bad key

    def _size_grid(self) -> None:
        """``--target-effect``: the cells one mode needs (:func:`ctxaware.stats.n_for_proportions`, all discordant
        cells one way: the fewest possible) and depths spread evenly over 0-100 % to reach them."""
        import logging
        import math

        from ..stats import n_for_proportions

        if not 0 < float(self.target_effect) <= 1:
            raise ConfigError(f"target_effect must be in (0, 1], got {self.target_effect}")
        need = n_for_proportions(float(self.target_effect))
        lengths = self.niah_config().grid_lengths()
        depths = self.niah_config().grid_depths()
        if len(lengths) * len(depths) >= need:
            return
        per = math.ceil(need / len(lengths))
        if per > 101:
            raise ConfigError(f"target_effect {self.target_effect:g} needs at least {need} cells per mode; "
                              f"{len(lengths)} length(s) x 101 depths give {101 * len(lengths)}: add --lengths "
                              f"(at least {math.ceil(need / 101)})")
        self.depths = ",".join(f"{100 * i / (per - 1):.4g}" for i in range(per))
        logging.getLogger(__name__).info("target effect %g: %d cells per mode needed, %d length(s) x %d depths",
                                         self.target_effect, need, len(lengths), per)

    def niah_config(self, task: str | None = None) -> NiahConfig:
        """The NIH part of the study for ``task`` (results in ``DIR/niah-<task>``), or for ``needle`` (``DIR/niah``)."""
        out = f"{self.out}/niah" if task is None else f"{self.out}/niah-{task_slug(task)}"
        return NiahConfig(model=self.model, haystack=self.haystack, needle=self.needle if task is None else task,
                          lengths=self.lengths, depths=self.depths, modes=self.modes, steering=self.steering,
                          alpha=self.alpha, heads=self.heads, max_new_tokens=self.max_new_tokens,
                          batch_size=self.batch_size, dtype=self.dtype, device=self.device, out=out,
                          overwrite=self.overwrite, progress=self.progress,
                          effective_threshold=self.effective_threshold, shard=self.shard, **self.engine_options())

    def niah_configs(self) -> dict[str, NiahConfig]:
        """Every NIH part by name: ``{needle: DIR/niah}`` without tasks, else one per task."""
        out: dict[str, NiahConfig] = {}
        for task in self.task or [None]:
            spec = self.needle if task is None else task
            for i in self.phrasing_indices(spec):
                out[spec if i == 0 else f"{spec}@q{i}"] = self.niah_config(task if i == 0 else f"{spec}@q{i}")
        return out

    def multidoc_config(self) -> Any:
        """The multi-document QA part (``DIR/multidoc``): the study's model, dtype, steering and budget."""
        from ..multidoc import MultidocConfig
        from ..multidoc.config import MODES

        modes = [m for m in MODES.split(",") if "ind" not in m and ("steer" not in m or self.steered)]
        steer = {"steering": self.steering} if self.steering else {"alpha": self.alpha, "heads": self.heads}
        return MultidocConfig(data=self.multidoc, model=self.model, out=f"{self.out}/multidoc",
                              questions=self.multidoc_questions, k=self.multidoc_k, modes=modes, dtype=self.dtype,
                              device=self.device, progress=self.progress, overwrite=self.overwrite, **steer)

    def phrasing_indices(self, spec: str) -> list[int]:
        """The phrasings of needle/task ``spec`` this study runs (``phrasings``: all, or indices it has)."""
        from ..niah.needles import load_needle

        count = len(load_needle(spec, None).phrasings)
        if str(self.phrasings).strip().lower() == "all":
            return list(range(count))
        items = self.phrasings.split(",") if isinstance(self.phrasings, str) else list(self.phrasings)
        try:
            chosen = sorted({int(str(v).strip()) for v in items if str(v).strip()})
        except ValueError:
            raise ConfigError(f"phrasings must be 'all' or indices, got {self.phrasings!r}") from None
        bad = [i for i in chosen if not 0 <= i < count]
        if bad or not chosen:
            raise ConfigError(f"phrasings {self.phrasings!r}: {spec} has phrasings 0..{count - 1}")
        return chosen

    def engine_options(self) -> dict[str, Any]:
        """The engine fields, as the NIH and MT-Bench parts take them."""
        return {"engine": self.engine, "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size, "vllm_options": self.vllm_options}

    @property
    def steered(self) -> bool:
        return any("steer" in canonical_mode(m).split("+") for m in self.niah_config().modes)

    def mtbench_configs(self) -> list[Any]:
        """The MT-Bench runs (into ``DIR/mtbench``): plain chat, then steered like the study when it steers."""
        if not self.mtbench_judge_url:
            return []
        from ..mtbench import MtBenchConfig

        common = dict(model=self.model, out=f"{self.out}/mtbench", data_dir=self.mtbench_data_dir,
                      limit=self.mtbench_limit, max_new_tokens=self.mtbench_max_new_tokens,
                      judge_base_url=self.mtbench_judge_url, judge_model=self.mtbench_judge_model, dtype=self.dtype,
                      device=self.device, progress=self.progress, **self.engine_options())
        steer = {"steering": self.steering} if self.steering else {"alpha": self.alpha, "heads": self.heads}
        return [MtBenchConfig(**common)] + ([MtBenchConfig(**common, **steer)] if self.steered else [])


def task_slug(task: str) -> str:
    """The directory name part of a task: its name, or a task file's stem."""
    import re

    name = Path(task).stem if Path(task).suffix.lower() in (".yaml", ".yml", ".json") else task
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"


def _task_list(value: Any) -> list[str]:
    if value in (None, "", []):
        return []
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    slugs = [task_slug(t) for t in items]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise ConfigError(f"task: {', '.join(dup)} named twice (each task needs its own DIR/niah-<task>)")
    return items


def _qa_list(value: Any) -> list[str]:
    if value in (None, "", []):
        return []
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    bad = [v for v in items if v not in QA_DATASETS]
    if bad:
        raise ConfigError(f"qa: unknown dataset(s) {', '.join(bad)}; choose from {', '.join(QA_DATASETS)}")
    return list(dict.fromkeys(items))
