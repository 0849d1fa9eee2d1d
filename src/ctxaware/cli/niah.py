"""Run the needle-in-a-haystack study (quick preset on the embedded model by default), or redraw its plots.

``ctxaware niah [options]`` runs (or resumes) a study and prints the average recall error and
effective length per mode; ``ctxaware niah plot DIR`` redraws the heatmaps of a results directory.
``--needle`` takes a needle or a task (multi-key, multi-value, multi-query, literal-free, a file);
``--shard i/n`` runs one shard of the grid (a later run without it merges), and under
``accelerate launch`` every process takes its own shard.
"""

from __future__ import annotations

import argparse

HELP = "needle-in-a-haystack study: recall by context length × depth, per mode (± template, ± steering)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..niah.config import PRESETS, NiahConfig
    from .options import add_config_options

    parser.add_argument("action", nargs="?", choices=("run", "plot"), default="run",
                        help="run (default) the study, or plot: redraw the heatmaps and summary of DIR")
    parser.add_argument("directory", nargs="?", metavar="DIR", help="results directory for 'plot'")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                        help="base settings: quick (CPU, embedded model, minutes) or paper (20 x 20 grid of "
                             "METHOD §5); options given explicitly override it; the defaults shown below "
                             "are the quick preset's")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of NIH options (between preset and options)")
    add_config_options(parser, NiahConfig)


def _threshold(directory: str) -> float:
    """The effective-length threshold the study of ``directory`` was run with (its manifest), else 0.85."""
    import json
    from pathlib import Path

    from ..report.niah import threshold

    try:
        return threshold(json.loads((Path(directory) / "manifest.json").read_text(encoding="utf-8")).get("config"))
    except (OSError, ValueError, AttributeError):
        return threshold(None)


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..niah.plot import plot_results
    from ..niah.results import read_records, write_summary
    from ..niah.scoring import format_table

    directory = args.directory or args.out
    if not directory:
        raise ConfigError("ctxaware niah plot needs a results directory: ctxaware niah plot DIR")
    if not (Path(directory) / "results.jsonl").is_file() and list(Path(directory).glob("results.shard-*-of-*.jsonl")):
        raise ConfigError(f"{directory} holds only shard files: rerun the study's command without --shard to merge "
                          "them first")
    records = read_records(directory)
    modes = list(dict.fromkeys(r["mode"] for r in records))
    summary = write_summary(directory, records, modes, threshold=_threshold(directory))
    print(format_table(summary))
    for p in plot_results(directory, records, modes):
        print(f"wrote {Path(p)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.action == "plot":
        return _plot(args)
    if args.directory:
        raise ConfigError(f"unexpected argument {args.directory!r}; use --out DIR to choose the output directory")
    from ..niah.config import NiahConfig, preset_values
    from ..niah.runner import run_niah
    from .options import config_from_args

    config = config_from_args(NiahConfig, args, base=preset_values(args.preset))
    result = run_niah(config)
    if not result.records:
        print(f"NIH shard {result.shard[0]}/{result.shard[1]}: no cells of the grid fall in this shard")
        return 0
    first = result.records[0]
    shard = f" · shard {result.shard[0]}/{result.shard[1]}" if result.shard[1] > 1 else ""
    print(f"NIH: {first['model']} · needle {config.needle} · haystack {first['haystack']} "
          f"· {len(result.records)} cells ({result.new_cells} new){shard}")
    print(result.table())
    if result.shard[1] > 1 and config.shard is None:
        print(f"process {result.shard[0]} of {result.shard[1]}: the main process merges the shards")
        return 0
    if result.shard[1] > 1:
        print(f"shard files in {result.out}/; when every shard is done, run the same command without --shard "
              "to merge them (and write summary and heatmaps)")
        return 0
    print(f"results in {result.out}/ (results.jsonl, summary.md" + (", heatmaps" if result.plots else "") + ")")
    return 0
