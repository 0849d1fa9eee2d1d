"""Benchmark: what the context-awareness monitor costs a training run (target: <= 10 % on ``smollm2-cpu``).

The same training, with the same recipe, data, seed and steps, runs without the monitor and with it
(``ContextAwarenessCallback`` at its defaults, or ``--every``/``--lengths``/``--depths`` as given), in
alternating rounds so that machine noise hits both. Prints each run's wall time of ``trainer.train()``
and its process CPU time (model loading and the final save left out: they do not depend on the
monitor), the time the monitor spent probing, the overhead ratios, and whether the loss curves are
identical (they must be). CPU time is the robust measure on a machine shared with other jobs (wall
time then depends on what else runs). A run shorter than the recipe's (``--steps``) also prints the
ratio extrapolated to the recipe's steps and the monitor's default interval from the measured
costs per step and per probe.

    python benchmarks/monitor_overhead.py --quick      # tiny random model, seconds (a smoke test)
    python benchmarks/monitor_overhead.py              # the smollm2-cpu recipe on the embedded model (minutes)
    python benchmarks/monitor_overhead.py --method full --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_overhead import DEFAULT_DATA, _conversations, _tiny  # noqa: E402


def run(config, convs) -> dict:
    from ctxaware.training.trainer import build_trainer

    setup = build_trainer(config, conversations=convs)
    t0, c0 = time.perf_counter(), time.process_time()
    setup.trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    cb = setup.extras.get("monitor")
    return {"seconds": seconds, "cpu": cpu, "losses": [h["loss"] for h in setup.trainer.state.log_history if "loss" in h],
            "probe": cb.seconds if cb else 0.0, "probe_cpu": cb.cpu_seconds if cb else 0.0,
            "probes": len(cb.history) if cb else 0, "steps": setup.trainer.state.global_step,
            "last": cb.history[-1] if cb and cb.history else None, "every": cb.every(setup.trainer.args) if cb else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 6 steps (a smoke test)")
    parser.add_argument("--recipe", default="smollm2-cpu", help="training recipe (default: smollm2-cpu)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="conversations (JSONL with messages)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--method", choices=("lora", "full"), default=None, help="default: the recipe's")
    parser.add_argument("--every", type=int, default=None, help="probe every N steps (default: the monitor's)")
    parser.add_argument("--monitor-option", action="append", default=[], metavar="KEY=VALUE",
                        help="other MonitorConfig fields, e.g. lengths=500 (repeatable)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; each side reports its best")
    args = parser.parse_args(argv)

    import torch
    import yaml

    from ctxaware.training.config import load_recipe

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    options = {}
    for pair in args.monitor_option:
        key, _, value = pair.partition("=")
        options[key.strip()] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as tmp:
        over = {"output_dir": str(Path(tmp) / "out"), "progress": False, "indicator": True}
        if args.quick:
            over.update(model=_tiny(Path(tmp)), max_steps=6, save_steps=3)
        if args.steps:
            over["max_steps"] = args.steps
        if args.method:
            over["method"] = args.method
        config = load_recipe(args.recipe, **over)
        convs = _conversations(args.data, config.max_steps * config.per_device_train_batch_size)
        watched = config.replace(monitor=True, monitor_every=args.every, monitor_options=options)
        plain, mon = [], []
        for _ in range(max(1, args.rounds)):
            plain.append(run(config, convs))
            mon.append(run(watched, convs))
    p = min(plain, key=lambda r: r["cpu"])
    m = min(mon, key=lambda r: r["cpu"])
    same = all(r["losses"] == plain[0]["losses"] for r in plain + mon)
    print(f"recipe {args.recipe}{' (--quick: tiny random model)' if args.quick else ''} · {config.method} · "
          f"{config.max_steps} steps of {config.per_device_train_batch_size} conversations · max_length "
          f"{config.max_length} · monitor every {m['every']} steps, {m['probes']} probes · threads "
          f"{torch.get_num_threads()}")
    print(f"without monitor : {p['seconds']:8.1f} s wall, {p['cpu']:8.1f} s CPU trainer.train()")
    print(f"with monitor    : {m['seconds']:8.1f} s wall, {m['cpu']:8.1f} s CPU trainer.train(), of which probing "
          f"{m['probe']:.1f} s wall, {m['probe_cpu']:.1f} s CPU ({m['probe_cpu'] / max(m['probes'], 1):.1f} s CPU per probe)")
    print(f"overhead        : {m['seconds'] / p['seconds'] - 1:+.1%} wall, {m['cpu'] / p['cpu'] - 1:+.1%} CPU; probing CPU / "
          f"training CPU without it {m['probe_cpu'] / p['cpu']:.1%} (target <= 10 %)")
    # the same costs at the recipe's own steps and the monitor's default interval (a shorter --steps run measures
    # them sooner): probes at 0, every, 2*every, ... and after the last step
    full = load_recipe(args.recipe)
    steps0 = full.max_steps
    every0 = full.save_steps  # the monitor's default interval (no evaluation by steps in the recipes)
    probes0 = 1 + steps0 // every0 + (steps0 % every0 != 0)
    per_step, per_probe = p["cpu"] / p["steps"], m["probe_cpu"] / max(m["probes"], 1)
    print(f"at the recipe's {steps0} steps, every {every0} ({probes0} probes): probing / training CPU "
          f"{probes0 * per_probe / (steps0 * per_step):.1%} ({per_step:.1f} s CPU per step, {per_probe:.1f} per probe)")
    print(f"loss curves identical: {same} ({len(p['losses'])} logged losses)")
    if m["last"]:
        print("last probe:", ", ".join(f"{k} {v:.3f}" for k, v in m["last"].items() if k != "step"),
              f"(step {m['last']['step']})")
    print()
    print("| run | trainer.train() s wall / CPU | probing s wall / CPU | overhead wall / CPU |")
    print("|---|---|---|---|")
    print(f"| without monitor | {p['seconds']:.1f} / {p['cpu']:.1f} | – | – |")
    print(f"| with monitor ({m['probes']} probes, every {m['every']}) | {m['seconds']:.1f} / {m['cpu']:.1f} | "
          f"{m['probe']:.1f} / {m['probe_cpu']:.1f} | {m['seconds'] / p['seconds'] - 1:+.1%} / {m['cpu'] / p['cpu'] - 1:+.1%} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
