"""One attention call, unsteered SDPA vs the steered paths: padded channels through SDPA, and compiled flex.

SmolLM2's attention shape (9 query heads, 3 kv heads, head dim 64, causal, no padding, the strided
layout transformers hands over), at each ``--lengths`` token count. Columns (seconds of the best
of ``--repeats``; CPU time on CPU, wall time with synchronisation on CUDA):

* ``plain``    — transformers' ``sdpa_attention_forward`` (what an unsteered layer runs);
* ``channels`` — ``functional.sdpa_key_bias`` forced onto the padded channels (``use_path("sdpa")``),
  the channel copies included;
* ``flex``     — the same call forced onto compiled ``flex_attention`` (``use_path("flex")``; compiled
  once before timing).
* ``thin``     — ``thin.attention``: the plain 64-wide fused call with its log-sum-exp, corrected
  over the down-weighted keys by eager ops (what ``auto`` takes on CPU for α ≥ 0.5 in fp32/fp64 and
  α ≥ 0.8 in bf16/fp16 with few down keys; give ``--down-keys 20`` for a chat prompt's system prompt
  and template tokens);
* ``fused``    — the same with the correction as one ``torch.compile``'d pass (``fused.use_mode("compiled")``;
  compiled before timing; the first call's seconds, compile included, go to stderr).

``--down`` is the fraction of keys that are down-weighted (the first ones, like a system prompt
before the user's document; default 0.3).

``--value-dim 32`` gives values a different head dim, a shape only SDPA's math kernel takes: then
``channels`` is the chunked math fallback and ``flex`` what ``auto`` picks instead. Ratios are
``first path's time / path's time`` (with ``plain`` first: throughput relative to unsteered SDPA).

    python benchmarks/steering_attention_call.py --lengths 2048,4096,8192 --repeats 3 --threads 1
    python benchmarks/steering_attention_call.py --dtype bfloat16 --lengths 4096
    python benchmarks/steering_attention_call.py --paths plain,channels,thin --down-keys 20 --lengths 2048,4096,8192
    python benchmarks/steering_attention_call.py --paths plain,channels,thin,fused --down-keys 20 --dtype bfloat16
    python benchmarks/steering_attention_call.py --value-dim 32 --lengths 4096,8192 --paths channels,flex
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

PATHS = ("plain", "channels", "flex", "thin", "fused")
DEFAULT_PATHS = ("plain", "channels", "flex")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,8192", help="token counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path; the fastest is kept")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--device", default="cpu", help="device (default: cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--value-dim", type=int, default=64, help="value head dim (64 = the model's; 32: math-only)")
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"paths to time, from {', '.join(PATHS)}")
    ap.add_argument("--down", type=float, default=0.3, help="fraction of down-weighted keys (the first ones)")
    ap.add_argument("--down-keys", type=int, default=None,
                    help="number of down-weighted keys instead of --down (a chat prompt steered toward the user's "
                         "turn has tens: its system prompt and template tokens)")
    args = ap.parse_args(argv)

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ctxaware.attention import flex as FX
    from ctxaware.attention import functional as AF
    from ctxaware.attention import fused as FU
    from ctxaware.attention import thin as TH

    torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if any(p not in PATHS for p in paths):
        ap.error(f"--paths takes {', '.join(PATHS)}")
    h, h_kv, d, dv = 9, 3, 64, args.value_dim

    class Module:
        is_causal, num_key_value_groups, training = True, h // h_kv, False

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        return time.process_time() - c0

    print(f"load average {os.getloadavg()[0]:.2f}, {args.dtype}, value dim {dv}, {args.threads} thread(s)",
          file=sys.stderr)
    base = paths[0]  # ratios are base time / path time: the path's throughput relative to the first one
    print("| tokens | " + " | ".join(f"{p} s" for p in paths) + " | " + " | ".join(f"{base}/{p}" for p in paths[1:])
          + " |")
    print("|---:|" + "---:|" * (2 * len(paths) - 1))
    for length in [int(x) for x in args.lengths.split(",") if x.strip()]:
        q = torch.randn(1, length, h, d, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(1, length, h_kv, d, dtype=dtype, device=device).transpose(1, 2)
        v = torch.randn(1, length, h_kv, dv, dtype=dtype, device=device).transpose(1, 2)
        n_down = args.down_keys if args.down_keys is not None else round(args.down * length)
        down = torch.arange(length, device=device)[None] < n_down
        coef = torch.full((1, h), math.log(args.alpha), dtype=torch.float64, device=device)

        def steered(path: str):
            def run():
                with FX.use_path(path):
                    AF.sdpa_key_bias(q, k, v, None, scaling=d ** -0.5, coef=coef, down=down)
            return run

        fns = {"plain": lambda: sdpa_attention_forward(Module(), q, k, v, None, scaling=d ** -0.5),
               "channels": steered("sdpa"), "flex": steered("flex"),
               "thin": lambda: TH.attention(q, k, v, scaling=d ** -0.5, coef=coef, down=down, mode="eager"),
               "fused": lambda: TH.attention(q, k, v, scaling=d ** -0.5, coef=coef, down=down, mode="compiled")}
        for p in ("thin", "fused"):
            if p in paths and fns[p]() is None:
                print(f"{p}: no kernel gave the log-sum-exp for {args.dtype} on {device.type}", file=sys.stderr)
                return 1
        if "fused" in paths:
            if FU.failures():
                print(f"the compiled correction failed: {FU.failures()}", file=sys.stderr)
                return 1
            if length == int(args.lengths.split(",")[0]):
                print(f"fused: first call {FU.compile_seconds().get(device.type, 0.0):.1f} s (compile included)",
                      file=sys.stderr)
        if "flex" in paths:
            fns["flex"]()  # compile outside the timing
            if FX.failures():
                print(f"flex failed to compile: {FX.failures()}", file=sys.stderr)
                return 1
        best = {p: math.inf for p in paths}
        for _ in range(max(1, args.repeats)):
            for p in paths:
                best[p] = min(best[p], timed(fns[p]))
        ratios = [f"{best[base] / best[p]:.3f}" for p in paths[1:]]
        print(f"| {length} | " + " | ".join(f"{best[p]:.3f}" for p in paths) + " | " + " | ".join(ratios) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
