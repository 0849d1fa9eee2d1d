"""Calibration cost: head ranking from attention (ours) vs PASTA-style per-head generation profiling.

Same model, same held-in NIH prompts (``CalibrationConfig`` cells, chat template):

* **ours** — :func:`ctxaware.calibrate.retrieval_scores`: one forward pass per prompt gives the
  attention of the answer query on the needle for *every* (layer, head) at once;
* **PASTA-style** — for each profiled head: steer that head alone (``--alpha``, PASTA's 0.01 by
  default), answer every prompt greedily, score recall; heads ranked by mean recall, ties broken
  by the mean loss of the needle sentence as the answer under the same single-head steering
  (a teacher-forced pass, timed separately and counted in PASTA's cost only as ``+tf``).

PASTA profiles every head; to finish on a CPU this profiles ``--heads`` of them: the
``--heads // 2`` best by our score and the rest drawn (seeded) from the others, so the subset holds
heads ours calls good and heads it calls poor. Printed: measured seconds, the per-head cost
extrapolated to all heads, the ratio ours : PASTA, and agreement of the two rankings on the
subset (overlap@k of the top k, Spearman's rho). Writes JSON to ``--out``.

    python benchmarks/calibration_cost.py                       # embedded model, 8 heads, 2 prompts
    python benchmarks/calibration_cost.py --heads 12 --lengths 2000,3000 --out cost.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho with average ranks for ties (NaN when either side is constant)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return float("nan") if va == 0 or vb == 0 else cov / (va * vb) ** 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--lengths", default="2500", help="held-in lengths (tokens)")
    ap.add_argument("--depths", default="10,40", help="held-in depths (%%)")
    ap.add_argument("--needle", default="pizza")
    ap.add_argument("--heads", type=int, default=8, help="heads profiled PASTA-style")
    ap.add_argument("--alpha", type=float, default=0.01, help="steering of the one profiled head (PASTA: 0.01)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/calibration_cost.json")
    args = ap.parse_args(argv)

    import torch

    from ctxaware.calibrate import CalibrationConfig, rank_heads, retrieval_scores
    from ctxaware.calibrate.guard import response_losses
    from ctxaware.calibrate.search import held_in_cells
    from ctxaware.models import load_model
    from ctxaware.niah.engine import GreedyEngine, Job
    from ctxaware.niah.scoring import recall
    from ctxaware.steering import SteeringConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    cfg = CalibrationConfig(lengths=args.lengths, depths=args.depths, needle=args.needle,
                            max_new_tokens=args.max_new_tokens, progress=False)
    cells, hay_id, needle = held_in_cells(cfg, tok)
    prompts = [(c["prompt"], needle.needle) for c in cells]

    t0 = time.perf_counter()
    scores = retrieval_scores(model, prompts)
    ours_s = time.perf_counter() - t0
    n_layers, n_heads = scores.shape
    ranked = rank_heads(scores)
    k_top = args.heads // 2
    rest = ranked[k_top:]
    subset = ranked[:k_top] + random.Random(args.seed).sample(rest, min(len(rest), args.heads - k_top))

    rows, gen_s, tf_s = [], 0.0, 0.0
    for layer, head in subset:
        steering = SteeringConfig(alpha=args.alpha, heads=f"{layer}:{head}")
        engine = GreedyEngine(model, tok, args.max_new_tokens, steer_config=steering, batch_size=len(cells))
        answers: dict[int, str] = {}
        t0 = time.perf_counter()
        engine.run([Job(c["prompt"], steer=True, tag=i) for i, c in enumerate(cells)],
                   lambda job, text: answers.__setitem__(job.tag, text))
        gen_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        loss = sum(response_losses(model, tok, [c["messages"] for c in cells], steering)) / len(cells)
        tf_s += time.perf_counter() - t0
        rec = sum(recall(answers[i], needle.keywords) for i in range(len(cells))) / len(cells)
        rows.append({"layer": layer, "head": head, "ours": float(scores[layer, head]), "pasta_recall": rec,
                     "pasta_needle_loss": loss})
        print(f"  head {layer}:{head}  ours {rows[-1]['ours']:.4f}  PASTA recall {rec:.3f}  needle loss {loss:.4f}",
              file=sys.stderr)

    pasta_key = [(r["pasta_recall"], -r["pasta_needle_loss"]) for r in rows]
    order_pasta = sorted(range(len(rows)), key=lambda i: pasta_key[i], reverse=True)
    order_ours = sorted(range(len(rows)), key=lambda i: rows[i]["ours"], reverse=True)
    overlap = {k: len(set(order_pasta[:k]) & set(order_ours[:k])) / k for k in (1, 2, 4) if k <= len(rows)}
    rank_pasta = [0.0] * len(rows)
    for pos, i in enumerate(order_pasta):
        rank_pasta[i] = -pos
    rho = spearman([r["ours"] for r in rows], rank_pasta)
    rho_recall = spearman([r["ours"] for r in rows], [r["pasta_recall"] for r in rows])
    rho_loss = spearman([r["ours"] for r in rows], [-r["pasta_needle_loss"] for r in rows])
    per_head_gen, per_head_tf = gen_s / len(rows), tf_s / len(rows)
    all_heads = n_layers * n_heads
    result = {
        "model": args.model, "prompts": len(cells), "tokens": [len(c["prompt"].input_ids) for c in cells],
        "haystack": hay_id, "needle": needle.name, "alpha": args.alpha, "max_new_tokens": args.max_new_tokens,
        "heads_total": all_heads, "heads_profiled": len(rows), "ours_seconds": ours_s,
        "pasta_generation_seconds": gen_s, "pasta_teacher_forced_seconds": tf_s,
        "pasta_all_heads_seconds_extrapolated": per_head_gen * all_heads,
        "ratio_all_heads": per_head_gen * all_heads / ours_s,
        "ratio_all_heads_with_tf": (per_head_gen + per_head_tf) * all_heads / ours_s,
        "ratio_profiled_subset": gen_s / ours_s,
        "overlap_at_k": overlap, "spearman_ranking": rho, "spearman_vs_recall": rho_recall,
        "spearman_vs_needle_loss": rho_loss, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"model {args.model}: {n_layers} x {n_heads} = {all_heads} heads, {len(cells)} prompts "
          f"({', '.join(str(t) for t in result['tokens'])} tokens)")
    print("| method | heads ranked | seconds | seconds for all heads |\n|---|---|---|---|")
    print(f"| ours (attention on the needle, 1 forward/prompt) | {all_heads} | {ours_s:.1f} | {ours_s:.1f} |")
    print(f"| PASTA-style (1 generation/prompt/head) | {len(rows)} | {gen_s:.1f} | "
          f"{per_head_gen * all_heads:.0f} (extrapolated) |")
    print(f"ratio for all heads: {result['ratio_all_heads']:.0f}x cheaper "
          f"({result['ratio_all_heads_with_tf']:.0f}x counting PASTA's tie-break pass); "
          f"on the {len(rows)} profiled heads alone: {result['ratio_profiled_subset']:.1f}x")
    print(f"agreement on the {len(rows)} profiled heads: overlap@k {overlap}, Spearman (PASTA ranking) {rho:.2f}, "
          f"vs PASTA recall {rho_recall:.2f}, vs needle loss {rho_loss:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
