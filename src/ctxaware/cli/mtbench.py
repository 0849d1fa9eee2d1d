"""Answer MT-Bench's 80 two-turn questions with the model and have any OpenAI-compatible model judge them.

``ctxaware mtbench --judge-base-url URL --judge-model NAME`` generates both turns of every question
(under the same conditions as the other commands: chat template, ``--indicator``, steering, adapter),
judges each turn with MT-Bench's single-answer grading and prints the scores; rerunning with the
same ``--out`` resumes. See docs/mtbench.md.
"""

from __future__ import annotations

import argparse

HELP = "MT-Bench: two-turn answers judged by an OpenAI-compatible model (general ability next to context use)"
EPILOG = """\
examples:
  ctxaware mtbench --judge-base-url https://api.openai.com/v1 --judge-model gpt-4 --out runs/mtbench
  ctxaware mtbench --judge-base-url http://127.0.0.1:8000/v1 --limit 8 --max-new-tokens 128
  ctxaware mtbench --model ADAPTER_DIR --indicator --judge-base-url URL --judge-model NAME --out runs/mtbench
  ctxaware mtbench --steering runs/calib/steering.yaml --judge-base-url URL --judge-model NAME --out runs/mtbench
The judge's API key is read from $OPENAI_API_KEY (or the variable named by --judge-api-key-env).
Several conditions (and models) can share one --out; ctxaware report DIR shows them side by side.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..mtbench import MtBenchConfig
    from .options import MODEL_OPTIONS, add_config_options, add_model_options

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of MT-Bench options (MtBenchConfig fields)")
    add_model_options(parser)
    add_config_options(parser, MtBenchConfig, exclude=MODEL_OPTIONS)


def run(args: argparse.Namespace) -> int:
    from ..mtbench import MtBenchConfig, format_summary, run_mtbench
    from .options import config_from_args

    config = config_from_args(MtBenchConfig, args)
    config.require_judge()
    result = run_mtbench(config)
    print(format_summary(result.summary))
    print(f"results in {result.out}/ (answers.jsonl, judgments.jsonl, summary.json)")
    return 0
