"""``CalibrationConfig``: what ``ctxaware calibrate`` searches, on which held-in cells, under which guard.

The defaults are sized for the embedded model on 2 CPU cores: 2 held-in NIH cells (length 3000 ×
depths 10/40 %, needle ``pizza`` in the built-in corpus read from its last essay backwards: text,
needle, length and depths disjoint from the held-out grid of ``ctxaware calibrate judge``, which
uses ``SF`` in the corpus from its first essay at 5000 tokens (docs: 4000-6000) × depths
0/25/50 %), 3 head sets × α 0.6/0.7/0.8/0.9 (on the embedded model all heads at α ≤ 0.6 fail the
guard and 0.7-0.9 keep it, so the grid is fine where the guard binds), a quality guard of 8
instruction responses and 8 QA answers, and selection by the held-in needle loss. ``select_by="recall"`` (cells with recall 1, mean recall, then loss, among the
``recall_top`` lowest-loss candidates) needs held-in cells the chat template loses *and* can
answer in full (e.g. ``pizza-short`` at 4500/6500 tokens): on the embedded model no guarded
candidate recovered any such cell, so recall gave no signal there (docs/calibration.md). Every
field is a CLI option of ``ctxaware calibrate`` (help written once, here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigMixin, attn_implementation_field, device_map_field, field, trust_remote_code_field
from ..errors import ConfigError

#: the built-in corpus with its files in reverse order: held-in text disjoint from the quick grid's
BUILTIN_TAIL = "builtin-tail"
HEAD_SET_HELP = ('candidate head sets, comma-separated: "topK" (the K best heads overall), "layerK" (the K best '
                 'heads of every layer), "all" (every head)')


def split_list(value: Any, what: str, kind: type = str) -> list:
    """``"a,b"`` or a list -> a list of ``kind``; one-line :class:`ConfigError` on bad items."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{what} must be a comma-separated string or a list, got {value!r}")
    if not items:
        raise ConfigError(f"{what} is empty")
    try:
        return [kind(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not a list of {kind.__name__} values") from None


def parse_head_set(name: str) -> tuple[str, int]:
    """``"top16"`` -> ``("top", 16)``, ``"layer1"`` -> ``("layer", 1)``, ``"all"`` -> ``("all", 0)``."""
    text = str(name).strip().lower()
    if text == "all":
        return "all", 0
    for kind in ("top", "layer"):
        if text.startswith(kind) and text[len(kind):].isdigit() and int(text[len(kind):]) > 0:
            return kind, int(text[len(kind):])
    raise ConfigError(f"head set {name!r} is not valid; use {HEAD_SET_HELP}")


@dataclass
class CalibrationConfig(ConfigMixin):
    """One calibration: model, held-in NIH cells, candidate head sets and α values, quality guard."""

    model: str = field("embedded", help="model: 'embedded', a Hugging Face id, a local directory or a .gguf file")
    out: str = field("runs/calibrate", metavar="DIR",
                     help="output directory: steering.yaml, search.csv, search.json, calibration.png")
    haystack: str = field(BUILTIN_TAIL, metavar="SOURCE",
                          help="held-in haystack: 'builtin-tail' (the built-in corpus from its last essay "
                               "backwards), 'builtin', or a .txt file / directory of .txt files; keep it "
                               "disjoint from the text you judge on")
    needle: str = field("pizza", metavar="NEEDLE",
                        help="held-in needle or task (SF, pizza, multi-key, ... or a YAML/JSON needle file: head "
                             "scores cover every needle of a task); keep it different from the needle you judge on")
    lengths: Any = field("3000", metavar="L1,L2,...",
                         help="held-in context lengths in tokens (long enough that the unsteered chat model loses "
                              "cells: the search warns when it loses none)")
    depths: Any = field("10,40", metavar="D1,D2,...", help="held-in needle depths in percent")
    head_sets: Any = field("top16,layer1,all", metavar="SETS", help=HEAD_SET_HELP)
    alphas: Any = field("0.6,0.7,0.8,0.9", metavar="A1,A2,...",
                        help="alpha values tried with every head set (weight kept on non-user prompt keys)")
    shares: Any = field("", metavar="S1,S2,...",
                        help='target shares tried under the "share" rule with every head set (the emphasised keys '
                             'get at least this share of each steered query\'s attention); empty = fixed alpha only')
    select_by: str = field("needle_loss", choices=("needle_loss", "recall"),
                           help='held-in score that picks the candidate: "needle_loss" (mean loss of the needle '
                                'sentence as the answer, one forward pass per cell; recall is then measured for '
                                'the baseline and the chosen candidate only) or "recall" (held-in cells answered '
                                'greedily with recall 1, then mean recall, then needle loss; only the --recall-top '
                                'candidates with the lowest needle loss are answered: use it with cells the '
                                'unsteered model loses and a needle it can recall in full, e.g. pizza-short)')
    recall_top: int = field(3, help="with --select-by recall: answer only the K guard-passing candidates with the "
                                    "lowest held-in needle loss (and the unsteered model); 0 = every candidate")
    margin: float = field(0.05, help="quality guard: the steered mean token loss (nats) of each guard set may "
                                     "exceed the unsteered one by at most this much")
    instructions: str = field("", metavar="FILE",
                              help="guard conversations: a JSONL file of {'messages': [...]} rows (loss on the "
                                   "first assistant response); empty = a small built-in set")
    qa: str = field("", metavar="FILE",
                    help="guard QA: a SQuAD file (HF rows as JSONL, or the original JSON); the gold answer "
                         "is the response; empty = a small built-in set")
    guard_examples: int = field(8, help="examples taken from each guard set (a seeded sample of those under "
                                        "1500 characters)")
    max_new_tokens: int = field(40, help="greedy decoding budget per held-in answer")
    reserve: int = field(200, help="tokens of each length kept for template, question and answer (as in niah)")
    batch_size: int = field(4, help="held-in cells decoded together")
    dtype: str = field("auto", choices=("float32", "bfloat16", "float16", "auto"), help="model dtype: auto = bfloat16 where the hardware computes it fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else float32; float32 for exact comparisons")
    device: str | None = field(None, help="torch device (default: CPU, or the model's device)")
    device_map: str | None = device_map_field()
    attn_implementation: str | None = attn_implementation_field()
    trust_remote_code: bool = trust_remote_code_field()
    resume: bool = field(True, help="reuse the steps an earlier run with the same settings finished (kept under "
                                    "DIR/cache/); --no-resume recomputes everything")
    plot: bool = field(True, help="draw calibration.png (needs matplotlib)")
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self) -> None:
        self.lengths = [int(v) for v in split_list(self.lengths, "lengths", float)]
        self.depths = [float(v) for v in split_list(self.depths, "depths", float)]
        self.head_sets = [str(s).strip().lower() for s in split_list(self.head_sets, "head_sets")]
        for s in self.head_sets:
            parse_head_set(s)
        self.alphas = split_list(self.alphas, "alphas", float)
        if any(not 0.0 < a < 1.0 for a in self.alphas):
            raise ConfigError(f"alphas must lie in (0, 1) (1 is the unsteered baseline, always measured), "
                              f"got {self.alphas}")
        self.shares = [] if self.shares in (None, "", []) else split_list(self.shares, "shares", float)
        if any(not 0.0 < v < 1.0 for v in self.shares):
            raise ConfigError(f"shares must lie strictly between 0 and 1, got {self.shares}")
        if any(v < 50 for v in self.lengths):
            raise ConfigError(f"lengths must be token counts >= 50, got {self.lengths}")
        if any(not 0 <= d <= 100 for d in self.depths):
            raise ConfigError(f"depths must be percentages in [0, 100], got {self.depths}")
        if not float(self.margin) >= 0:
            raise ConfigError(f"margin must be >= 0 nats, got {self.margin}")
        if int(self.recall_top) < 0:
            raise ConfigError(f"recall_top must be >= 0 (0 = answer every candidate), got {self.recall_top}")
        for name in ("guard_examples", "max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
