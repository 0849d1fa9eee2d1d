"""Calibrate attention steering for a model: heads from attention, α under a quality guard.

``ctxaware calibrate --model M --out DIR`` writes ``DIR/steering.yaml`` (for ``--steering FILE`` of
the steering commands and :func:`ctxaware.steering.load_steering_file`), ``DIR/search.csv``,
``DIR/search.json`` and ``DIR/calibration.png``. The defaults take about 10 minutes on the
embedded model on 2 CPU cores; see docs/calibration.md.
"""

from __future__ import annotations

import argparse

HELP = "choose steering heads and alpha for a model (held-in NIH cells, quality guard) -> steering.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..calibrate.config import CalibrationConfig
    from .options import add_config_options

    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of calibration options")
    add_config_options(parser, CalibrationConfig)


def run(args: argparse.Namespace) -> int:
    from ..calibrate import CalibrationConfig, calibrate
    from .options import config_from_args

    config = config_from_args(CalibrationConfig, args)
    result = calibrate(config)
    meta = result["meta"]
    print(f"calibrated {meta['model']}: {meta['reason']}")
    print(f"{'candidate':<16} {'heads':>5} {'guard':>5} {'instr +nats':>11} {'qa +nats':>9} {'held-in recall':>14}")
    for row in meta["search"]:
        rec = "-" if row["heldin_recall"] is None else f"{row['heldin_recall']:.3f}"
        print(f"{row['candidate']:<16} {row['n_heads']:>5} {'ok' if row['guard_passed'] else 'FAIL':>5} "
              f"{row.get('instructions_rise', 0.0):>11.4f} {row.get('qa_rise', 0.0):>9.4f} {rec:>14}")
    s = result["steering"]
    print(f"steering: alpha={s.alpha:g} heads={s.heads}")
    for p in result["files"]:
        print(f"wrote {p}")
    return 0
