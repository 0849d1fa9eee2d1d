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

    from ..calibrate.judge import JudgeConfig

    parser.add_argument("action", nargs="?", choices=("run", "judge"), default="run",
                        help="run (default): calibrate and write DIR/steering.yaml; judge: evaluate --steering FILE "
                             "on a held-out NIH grid and a SQuAD sample against chat and chat + all heads (there "
                             "--lengths/--depths/--haystack/--needle name the held-out grid: defaults 4000,5000,6000 / "
                             "0,25,50 / builtin / SF)")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of calibration (or judge) options")
    add_config_options(parser, CalibrationConfig)
    names = set(CalibrationConfig.field_names())
    group = parser.add_argument_group("judge options")
    add_config_options(group, JudgeConfig, exclude=tuple(n for n in JudgeConfig.field_names() if n in names))


def _only(args: argparse.Namespace, cls: type) -> argparse.Namespace:
    """The parsed options that belong to ``cls`` (the other action's options must not be given)."""
    from ..errors import ConfigError

    names = set(cls.field_names())
    common = {"config", "action", "debug", "command", "_run"}
    given = [k for k, v in vars(args).items() if v is not None and k not in names and k not in common]
    if given:
        raise ConfigError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in sorted(given))} do not apply "
                          f"to 'ctxaware calibrate {args.action}'")
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k in names or k == "config"})


def run(args: argparse.Namespace) -> int:
    from ..calibrate import CalibrationConfig, calibrate
    from .options import config_from_args

    if args.action == "judge":
        from ..calibrate.judge import JudgeConfig, judge

        result = judge(config_from_args(JudgeConfig, _only(args, JudgeConfig)))
        print(result["markdown"])
        print(f"wrote {args.out or JudgeConfig.out}/judge.json, judge.md")
        return 0
    config = config_from_args(CalibrationConfig, _only(args, CalibrationConfig))
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
