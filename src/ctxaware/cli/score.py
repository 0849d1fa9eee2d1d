"""Score each assistant turn of an instruction dataset by its dependency on the user's context.

``ctxaware score --in data.jsonl --out scored.jsonl`` adds ``ctx_scores`` (one score per assistant
turn, null where undefined), ``ctx_score_reasons`` and ``ctx_score_error`` to every row. Reruns
resume; ``--shard i/n`` (or ``accelerate launch``) splits the work; ``--merge`` joins the shards.
"""

from __future__ import annotations

import argparse
import json

from .options import add_config_options, config_from_args

HELP = "score instruction data by attention on the user's context (METHOD §3); resumable, shardable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..scoring.config import ScoringConfig

    parser.add_argument("--in", dest="input", metavar="DATA",
                        help="input: .jsonl/.json/.parquet, a saved datasets directory or a hub dataset name "
                             "(rows with 'messages' or ShareGPT 'conversations')")
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="output .jsonl/.json/.parquet (with --merge: the merged file to write)")
    parser.add_argument("--split", default="train", help="split of a datasets input (default: train)")
    parser.add_argument("--shard", metavar="I/N", help="score only rows with index %% N == I and write "
                        "OUT.shard-I-of-N.EXT (default under accelerate/torchrun: RANK/WORLD_SIZE)")
    parser.add_argument("--merge", action="store_true", help="join OUT.shard-*-of-N.EXT into OUT and exit")
    parser.add_argument("--overwrite", action="store_true", help="start again even if OUT or a partial run exists")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of scoring options")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_options(parser, ScoringConfig)
    from .options import add_model_options

    add_model_options(parser, model_help="probe model: HF id, local dir or .gguf (default: embedded); "
                      "--device defaults to cuda:LOCAL_RANK under accelerate/torchrun")


def _device(arg: str | None, device_map: str | None = None) -> str | None:
    """As asked; under a device map none; else ``cuda:LOCAL_RANK`` with several ranks, the default device."""
    if arg or device_map:
        return arg
    import os

    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return None


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..scoring import ScoringConfig, merge_shards, parse_shard, score_dataset

    if args.merge:
        path = merge_shards(args.out)
        print(f"merged shards into {path}")
        return 0
    if not args.input:
        raise ConfigError("--in DATA is required (unless --merge)")
    config = config_from_args(ScoringConfig, args)
    shard = parse_shard(args.shard)
    from pathlib import Path

    from ..config import check_local_input

    check_local_input(args.input, "input")  # checked before the model loads
    if Path(args.out).suffix not in (".jsonl", ".json", ".parquet", ".ndjson"):
        raise ConfigError(f"--out must end in .jsonl, .json or .parquet, got {Path(args.out).name}")
    from ..models import load_model

    from .options import model_kwargs

    kwargs = model_kwargs(args)
    kwargs["device"] = _device(args.device, args.device_map)
    loaded = load_model(args.model, **kwargs)
    summary = score_dataset(loaded.model, loaded.tokenizer, args.input, args.out, config, shard=shard,
                            split=args.split, model_name=loaded.name, progress=args.progress,
                            overwrite=args.overwrite)
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    if summary.rows == 0 and summary.complete:
        print(f"{summary.output} already exists; nothing to do (--overwrite to score again)")
        return 0
    print(f"wrote {summary.output}: {summary.rows} rows ({summary.skipped} resumed), "
          f"{summary.turns_scored} turns scored, layer {summary.layer}")
    if summary.turn_reasons:
        print("  turns without a score: " + ", ".join(f"{k} {v}" for k, v in summary.turn_reasons.most_common()))
    if summary.row_errors:
        print("  rows kept unscored: " + ", ".join(f"{k} {v}" for k, v in summary.row_errors.most_common()))
    if shard[1] > 1:
        print(f"  shard {shard[0]}/{shard[1]}: when all shards are done run "
              f"`ctxaware score --merge --out {args.out}`")
    return 0
