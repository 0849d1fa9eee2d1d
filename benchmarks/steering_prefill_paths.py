"""Whole-model steered prefill through each attention path, side by side in one process.

On the embedded model (or ``--model``), one chat prompt of each ``--lengths`` token count (a long
document in the user turn, steered toward it at ``--alpha``; the system prompt and template tokens
are the down-weighted keys, about 20): the CPU time (``time.process_time``; one thread by default)
of a prefill (``logits_to_keep=1``), best of ``--repeats`` interleaved runs, for

* ``plain``         — unsteered;
* ``channels``      — steered, forced onto the padded channels (``flex.use_path("sdpa")``);
* ``thin``          — steered under ``auto`` with the eager correction (``fused.use_mode("eager")``);
  where the gate refuses the correction (small α in half precision, ...) this is the channels too;
* ``thin-compiled`` — the same with the ``torch.compile``'d correction (compiled before timing).

Prints one Markdown row per length with the times and ``plain/path`` ratios (1.0 = free).

    python benchmarks/steering_prefill_paths.py --dtype bfloat16 --lengths 2048 --repeats 5
    python benchmarks/steering_prefill_paths.py --dtype float32 --lengths 2048,4096 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

PATHS = ("plain", "channels", "thin", "thin-compiled")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the embedded one)")
    ap.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    ap.add_argument("--lengths", default="2048", help="prompt tokens, comma-separated")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"from {', '.join(PATHS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if any(p not in PATHS for p in paths) or "plain" not in paths:
        ap.error(f"--paths takes plain and any of {', '.join(PATHS[1:])}")

    import torch

    from ctxaware import steer
    from ctxaware.attention import flex as FX
    from ctxaware.attention import fused as FU
    from ctxaware.models import load_model
    from steering_overhead import build_prompt

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    print(f"load average {os.getloadavg()[0]:.2f}, {args.dtype}, alpha {args.alpha}, {args.threads} thread(s)",
          file=sys.stderr)
    print("| tokens | " + " | ".join(f"{p} s" for p in paths) + " | "
          + " | ".join(f"plain/{p}" for p in paths if p != "plain") + " |")
    print("|---:|" + "---:|" * (2 * len(paths) - 1))
    for length in [int(x) for x in args.lengths.split(",") if x]:
        chat = build_prompt(tok, length)
        ids = torch.tensor([chat.input_ids])

        def run(path: str):
            def go():
                with torch.inference_mode():
                    if path == "plain":
                        return model(input_ids=ids, logits_to_keep=1)
                    with FX.use_path("sdpa" if path == "channels" else "auto"), \
                            FU.use_mode("compiled" if path == "thin-compiled" else "eager"), \
                            steer(model, emphasis=chat, alpha=args.alpha):
                        return model(input_ids=ids, logits_to_keep=1)
            return go

        for p in paths:  # warm-up (and compile)
            run(p)()
        best = {p: math.inf for p in paths}
        for _ in range(max(1, args.repeats)):
            for p in paths:
                t = time.process_time()
                run(p)()
                best[p] = min(best[p], time.process_time() - t)
        print(f"| {ids.shape[1]} | " + " | ".join(f"{best[p]:.3f}" for p in paths) + " | "
              + " | ".join(f"{best['plain'] / best[p]:.3f}" for p in paths if p != "plain") + " |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}; compiled correction first call: {FU.compile_seconds()}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
