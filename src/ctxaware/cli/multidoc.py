"""Multi-document QA by the position of the gold document ("lost in the middle").

``ctxaware multidoc --data squad.json [--k 4] [--positions all] [--out DIR]`` answers every question
with its gold paragraph among k distractors, the gold one at each position, in every mode, and writes
``DIR/results.jsonl``, ``DIR/summary.{json,md}`` and ``DIR/positions.png``; ``ctxaware report DIR``
adds the paired tests. Rerunning with the same ``--out`` resumes.
"""

from __future__ import annotations

import argparse

HELP = "multi-document QA by gold position (lost in the middle), every mode, resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..multidoc import MultidocConfig
    from .options import add_config_options

    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of multidoc options")
    add_config_options(parser, MultidocConfig)


def run(args: argparse.Namespace) -> int:
    from ..multidoc import MultidocConfig, run_multidoc
    from ..multidoc.summary import table
    from .options import config_from_args

    config = config_from_args(MultidocConfig, args)
    result = run_multidoc(config)
    print(f"multidoc: {len(result.records)} answers ({result.new} new) in {result.out}/")
    if result.summary.get("by_position"):
        print(table(result.summary))
    for p in result.plots:
        print(f"chart: {p}")
    return 0
