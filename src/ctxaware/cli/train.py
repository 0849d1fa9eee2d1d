"""Fine-tune a chat model on [IND]-labelled conversations (conditional SFT) with TRL and PEFT.

``ctxaware train --recipe smollm2-cpu --dataset labelled.jsonl --output-dir runs/ind`` trains with a
shipped recipe; ``--config recipe.yaml`` reads your own; any option below overrides both, and
``--sft-arg KEY=VALUE`` sets any other trl.SFTConfig field. ``--no-indicator`` strips [IND] from
the data: the vanilla baseline of the same recipe. ``--resume-from-checkpoint auto`` (or
``latest``) continues from the newest complete ``checkpoint-*`` in the output directory, skipping
one a kill left half-written: rerunning the same command after a crash finishes the same run.
``--monitor`` probes context awareness while training (NIH recall per mode, template gap, user-turn
attention share) every ``--monitor-every`` steps into ``OUTPUT_DIR/context_awareness.jsonl`` and the
trainer's loggers; ``--monitor-stop-gap X`` stops (saving a checkpoint) when the gap stays above X.
Several GPUs:
``accelerate launch --config_file $(ctxaware train --accelerate-config zero3) -m ctxaware train ...``.
"""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError

HELP = "conditional instruction fine-tuning with the [IND] indicator (TRL + PEFT)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import TrainConfig
    from .options import add_config_options

    parser.add_argument("--recipe", metavar="NAME", help="start from a shipped recipe (see --list-recipes)")
    parser.add_argument("--config", metavar="FILE", help="recipe YAML/JSON (TrainConfig fields); "
                        "applied over --recipe")
    parser.add_argument("--sft-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="set any other trl.SFTConfig field (value read as YAML); repeatable")
    parser.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    parser.add_argument("--accelerate-config", metavar="NAME", help="print the path of a shipped accelerate "
                        "config (zero3, fsdp, multi-gpu) and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_options(parser, TrainConfig)


def _sft_args(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sft-arg expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_config(args: argparse.Namespace):
    """The :class:`TrainConfig` from ``--recipe`` < ``--config`` < options < ``--sft-arg``."""
    from ..config import read_config_file
    from ..training.config import TrainConfig, recipe_path
    from .options import config_from_args

    base = read_config_file(recipe_path(args.recipe)) if args.recipe else {}
    config = config_from_args(TrainConfig, args, base=base)
    extra = _sft_args(args.sft_arg)
    if extra:
        config = config.replace(sft={**config.sft, **extra})
    return config


def run(args: argparse.Namespace) -> int:
    from ..training.config import list_recipes, recipes_dir

    if args.list_recipes:
        for name in list_recipes():
            print(name)
        return 0
    if args.accelerate_config:
        path = recipes_dir() / "accelerate" / f"{args.accelerate_config.removesuffix('.yaml')}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in (recipes_dir() / "accelerate").glob("*.yaml"))
            raise ConfigError(f"unknown accelerate config {args.accelerate_config!r}; shipped: {', '.join(names)}")
        print(path)
        return 0
    config = resolve_config(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    config.require_paths()
    from ..training.trainer import train

    result = train(config)
    summary = {"output_dir": result.output_dir, "adapter": result.adapter, "indicator_id": result.indicator_id,
               "examples": result.data.num_examples, "supervised_tokens": result.data.num_supervised,
               "train_loss": result.metrics.get("train_loss"), "steps": result.metrics.get("global_step"),
               "resumed_from": result.resumed_from, "monitor": result.monitor}
    if args.json:
        print(json.dumps(summary))
    else:
        kind = "adapter" if result.adapter else "model"
        loss = summary["train_loss"]
        resumed = f"; resumed from {result.resumed_from}" if result.resumed_from else ""
        print(f"saved {kind} to {result.output_dir} ({result.data.summary()}; "
              f"train loss {loss:.4f}{resumed})" if loss is not None else f"saved {kind} to {result.output_dir}")
        mon = result.monitor
        if mon:
            last = mon["last"] or {}
            gap = last.get("context/template_gap")
            share = last.get("context/user_share/template")
            stop = f"; stopped by the template-gap rule at step {mon['stopped_at']}" if mon["stopped_at"] else ""
            print(f"monitor: {mon['probes']} probes in {mon['seconds']:g} s of {mon['train_seconds']:g} s training"
                  + (f"; at step {last.get('step')}: template gap {gap:+.3f}" if gap is not None else "")
                  + (f", user share {share:.3f}" if share is not None else "") + f"{stop} ({mon['file']})")
    return 0
