"""How much the decoding batch changes greedy NIH answers: the same grid at several ``--batch-size``, per dtype.

Runs one small NIH grid (default 1k/2k tokens x depths 0/50/100 x modes chat, chat+steer: 12 cells) on
the embedded model with every batch size of ``--batch-sizes`` and every dtype of ``--dtypes``, each into
its own fresh directory, and prints, per dtype, how many cells answer differently from batch size 1
(the batch-free reference), side by side. Usage::

    python benchmarks/niah_batch_invariance.py --batch-sizes 1,4,8 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lengths", default="1000,2000")
    ap.add_argument("--depths", default="0,50,100")
    ap.add_argument("--modes", default="chat,chat+steer")
    ap.add_argument("--needle", default="SF")
    args = ap.parse_args()

    from ctxaware.models import load_model
    from ctxaware.niah import NiahConfig, run_niah

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for dtype in args.dtypes.split(","):
        loaded = load_model(args.model, dtype=dtype, device="cpu")
        answers: dict[int, dict[tuple, str]] = {}
        secs: dict[int, float] = {}
        for b in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = NiahConfig(model=args.model, lengths=args.lengths, depths=args.depths, modes=args.modes,
                                 needle=args.needle, batch_size=b, dtype=dtype, out=str(Path(tmp) / "niah"),
                                 progress=False)
                t0 = time.perf_counter()
                run = run_niah(cfg, model=loaded.model, tokenizer=loaded.tokenizer, model_name=loaded.name, plot=False)
                secs[b] = time.perf_counter() - t0
                answers[b] = {(r["mode"], r["length"], r["depth"]): r["answer"] for r in run.records}
        ref = answers[sizes[0]]
        for b in sizes:
            diff = sorted(k for k in ref if answers[b].get(k) != ref[k])
            print(f"{dtype:9s} batch {b:2d}: {len(diff)} of {len(ref)} cells answer differently from batch "
                  f"{sizes[0]} ({secs[b]:.1f} s){'; ' + ', '.join(f'{m} L={L} d={d:g}' for m, L, d in diff) if diff else ''}",
                  flush=True)


if __name__ == "__main__":
    main()
