"""Compare vanilla and conditional ([IND]) fine-tuning of one base model on one dataset, with one report.

``ctxaware sft-study --dataset FILE --out DIR`` scores the data with a probe (``--probe``), labels
the top fraction of turns with [IND] (``--target-fraction``, or ``--threshold``), trains a vanilla
and a conditional arm from the same base with the same recipe, seed, data order and steps
(``--recipe``, ``--lora``, ``--max-steps``), evaluates both (NIH, ``--qa squad,quac,drop``,
attention by role, MT-Bench with ``--mtbench-judge-url``) and writes ``DIR/report.html`` (the
paper's Table 3). Rerunning the same command resumes every stage. ``--config FILE`` reads the
options from YAML/JSON (``train_args:`` there sets any other ``ctxaware train`` option of both arms).
"""

from __future__ import annotations

import argparse

HELP = "vanilla vs conditional fine-tuning: score, label, train both arms, evaluate, one Table-3 report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..sftstudy.config import SftStudyConfig
    from .options import add_config_options

    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of sft-study options")
    add_config_options(parser, SftStudyConfig)


def run(args: argparse.Namespace) -> int:
    from ..sftstudy import SftStudyConfig, run_sft_study
    from ..sftstudy.report import table, verdicts
    from .options import config_from_args

    result = run_sft_study(config_from_args(SftStudyConfig, args))
    lab = result.state["stages"]["label"]
    print(f"labelled {lab['labelled_turns']} of {lab['scored_turns']} scored turns ({lab['fraction_labelled']:.3f})")
    for arm, t in result.state["stages"]["train"].items():
        print(f"{arm}: {t['steps']} steps in {t['seconds']:g} s, train loss {t['train_loss']:.4f}, "
              f"[IND] token {t['indicator_id']}")
    for f in verdicts(table(result.out)):
        print(f.text)
    print(f"report: {result.report}")
    return 0
