"""Benchmark: ctxaware's scorer vs the reference method of computing the context-dependency score.

Reference method (the authors' code, METHOD §3): eager attention, ``output_attentions=True`` for
*all* layers, batch 1, every conversation right-padded to ``--max-length`` (2047), then the
layer-ℓ matrix is reduced (max over heads of the mass on the keys, mean over the response).
Ours: :class:`ctxaware.scoring.Scorer` (the model's SDPA forward, attention mass on the key set
observed at layer ℓ only in query chunks, the forward stopped there, length-bucketed batches,
right padding without a mask). Both use the same rendering, keys and queries
(``Scorer.prepare``), so ``max |Δscore|`` measures the mechanism alone.

The conversations are a seeded sample of ``--n`` (default 200) rows with an assistant answer from
``../shared/data/instructions/converted/messages_mixed.jsonl``. Ours scores all of them. The
reference costs the same for every conversation (it always runs 2047 tokens), so when it is too
slow for this machine it runs on the first ``--reference-n`` conversations of the same sample and
its time for all ``--n`` is extrapolated (printed as such); the ratio on that common subset,
where both were measured, is printed too.

Each side runs in a fresh subprocess after loading the model; peak memory is that process's peak
(CUDA: ``max_memory_allocated``; CPU: peak RSS, reset after loading with
``/proc/self/clear_refs``), shown in total and above the loaded model. Our scorer's peak memory is
also measured on one synthetic conversation of about 1k and 8k tokens.

    python benchmarks/scoring_throughput.py --n 20 --reference-n 2 --memory-lengths 512,1024   # quick
    python benchmarks/scoring_throughput.py                                                     # full
    python benchmarks/scoring_throughput.py --device cuda --dtype bfloat16 --model DIR          # on a GPU

Ours also prints the SDPA kernel (``sdpa_probe``) its calls to the unmeasured layers were eligible for.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdpa_probe import kernel_summary, recorded_kernels  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instructions" / "converted" \
    / "messages_mixed.jsonl"
FILLER = "The passage describes a small town by the sea, its harbour, its people and their long winters. "


# ----------------------------------------------------------------------------- helpers (subprocesses)

def _sample(path: Path, n: int, seed: int) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"no data at {path}: pass --data FILE.jsonl (rows with 'messages')")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get("messages"), list)
            and any(m.get("role") == "assistant" and m.get("content") for m in r["messages"])]
    if len(rows) < n:
        raise SystemExit(f"{path} has only {len(rows)} usable rows, fewer than --n {n}")
    return random.Random(seed).sample(rows, n)


class _Peak:
    """Peak memory of this process from now on (CUDA allocator, or RSS high-water mark on CPU)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self.base = self._status("VmRSS")

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def read(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = self._status("VmHWM")
        return {"peak_mib": peak, "model_mib": self.base, "above_model_mib": peak - self.base}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_scores(model, prepared, layer: int, max_length: int, pad_id: int, reduction: str = "max"
                     ) -> tuple[list[list[float]], list[float]]:
    """The reference computation: eager, all layers' attentions, batch 1, right-padded to ``max_length``.

    Returns the scores of each conversation's scored turns and the seconds each conversation took.
    """
    import torch

    device = next(model.parameters()).device
    scores, seconds = [], []
    for p in prepared:
        t0 = time.perf_counter()
        n = len(p.ids)
        ids = torch.full((1, max_length), pad_id, dtype=torch.long)
        mask = torch.zeros((1, max_length), dtype=torch.long)
        ids[0, :n] = torch.tensor(p.ids)
        mask[0, :n] = 1
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_attentions=True)
        a = out.attentions[layer][0].float()  # (H, T, T)
        keys = torch.zeros(max_length, device=device)
        keys[:n] = torch.tensor(p.keys, dtype=torch.float32, device=device)
        per_head = a @ keys  # (H, T): mass of each query row on the keys
        red = per_head.max(0).values if reduction == "max" else per_head.mean(0)
        scores.append([float(red[turn].mean()) for turn in p.turns])
        del out, a
        _sync(str(device))
        seconds.append(time.perf_counter() - t0)
    return scores, seconds


def _role_ours(args) -> dict:
    import torch

    from ctxaware.models import load_model
    from ctxaware.scoring import Scorer, ScoringConfig

    convs = [r["messages"] for r in _sample(args.data, args.n, args.seed)]
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    scorer = Scorer(model, tok, ScoringConfig(max_length=args.max_length, batch_size=args.batch_size))
    with recorded_kernels() as kernels:
        scorer.score_many(convs[:2])  # warm-up (lazy imports, kernel selection); SDPA kernels of its calls
    peak = _Peak(args.device)
    _sync(args.device)
    t0 = time.perf_counter()
    rows = scorer.score_many(convs)
    _sync(args.device)
    total = time.perf_counter() - t0
    memory = peak.read()
    t0 = time.perf_counter()
    scorer.score_many(convs[:args.reference_n])
    _sync(args.device)
    subset = time.perf_counter() - t0
    prepared = [scorer.prepare(c) for c in convs]
    return {"seconds": total, "subset_seconds": subset, "memory": memory, "layer": scorer.layer,
            "tokens": [len(p.ids) for p in prepared], "turns": sum(len(p.turns) for p in prepared),
            "scores": [[s for s in (r.scores or []) if s is not None] for r in rows],
            "torch_threads": torch.get_num_threads(), "sdpa_kernels": kernel_summary(kernels)}


def _role_reference(args) -> dict:
    from ctxaware.models import load_model
    from ctxaware.scoring import Scorer, ScoringConfig

    convs = [r["messages"] for r in _sample(args.data, args.n, args.seed)][:args.reference_n]
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation="eager")
    scorer = Scorer(model, tok, ScoringConfig(max_length=args.max_length))
    prepared = [scorer.prepare(c) for c in convs]
    peak = _Peak(args.device)
    scores, seconds = reference_scores(model, prepared, scorer.layer, args.max_length,
                                       tok.pad_token_id if tok.pad_token_id is not None else 0)
    return {"seconds": seconds, "scores": scores, "memory": peak.read(), "layer": scorer.layer}


def _role_memory(args) -> dict:
    from ctxaware.models import load_model
    from ctxaware.scoring import Scorer, ScoringConfig

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    per = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    reps = max(3, args.tokens // per)
    conv = [{"role": "user", "content": FILLER * (reps * 2 // 3) + "Summarise the passage."},
            {"role": "assistant", "content": FILLER * (reps // 3)}]
    scorer = Scorer(model, tok, ScoringConfig(max_length=args.tokens * 2, batch_size=1))
    n = len(scorer.prepare(conv).ids)
    scorer.score([{"role": "user", "content": FILLER}, {"role": "assistant", "content": FILLER}])  # warm-up
    peak = _Peak(args.device)
    t0 = time.perf_counter()
    row = scorer.score(conv)
    _sync(args.device)
    return {"tokens": n, "score": row.scores[0], "seconds": time.perf_counter() - t0, **peak.read()}


# ----------------------------------------------------------------------------- driver

def _child(role: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--_role", role, "--n", str(args.n), "--reference-n", str(args.reference_n),
           "--data", str(args.data), "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--seed", str(args.seed)]
    if args.model:
        cmd += ["--model", args.model]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{role} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="conversations scored by ours (default 200)")
    ap.add_argument("--reference-n", type=int, default=12,
                    help="of those, how many the reference runs (default 12; = --n for no extrapolation)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL with a 'messages' column")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--model", default=None, help="probe model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--dtype", default="float32", help="weights dtype of both sides (default: float32, for the "
                    "|Δscore| comparison; bfloat16 on a GPU)")
    ap.add_argument("--batch-size", type=int, default=8, help="our batch size (default 8)")
    ap.add_argument("--max-length", type=int, default=2047)
    ap.add_argument("--memory-lengths", default="1024,8192", help="token counts for our memory probe")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--_role", choices=("ours", "reference", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.reference_n = min(args.reference_n, args.n)
    if args._role:
        role = {"ours": _role_ours, "reference": _role_reference, "memory": _role_memory}[args._role]
        print(json.dumps(role(args)))
        return 0

    k, n = args.reference_n, args.n
    print(f"data: {args.data} (seeded sample of {n}, seed {args.seed}); device {args.device}; "
          f"{os.cpu_count()} CPUs", flush=True)
    ours = _child("ours", args)
    tokens = ours["tokens"]
    print(f"ours: {n} conversations, {ours['turns']} scored turns, layer {ours['layer']}, tokens per "
          f"conversation mean {statistics.mean(tokens):.0f} / median {statistics.median(tokens):.0f} / "
          f"max {max(tokens)}, {ours['seconds']:.1f} s; SDPA kernels of the unmeasured layers: "
          f"{ours['sdpa_kernels']}", flush=True)
    ref = _child("reference", args)
    ref_per = statistics.mean(ref["seconds"])
    ref_total = ref_per * n
    extrapolated = k < n
    print(f"reference: {k} conversations measured, {sum(ref['seconds']):.1f} s ({ref_per:.2f} ± "
          f"{statistics.pstdev(ref['seconds']):.2f} s each)", flush=True)

    deltas = [abs(a - b) for o, r in zip(ours["scores"][:k], ref["scores"]) for a, b in zip(o, r)]
    if [len(s) for s in ours["scores"][:k]] != [len(s) for s in ref["scores"]]:
        raise SystemExit("turn count mismatch between ours and the reference")
    delta = max(deltas, default=0.0)
    rows = [
        ("conversations scored", f"{n}", f"{k}" + (f" (time for {n} extrapolated)" if extrapolated else "")),
        ("time for all conversations (s)", f"{ours['seconds']:.1f}",
         f"{ref_total:.1f}" + (" (extrapolated)" if extrapolated else "")),
        ("throughput (conv/s)", f"{n / ours['seconds']:.2f}",
         f"{1 / ref_per:.3f}" + (" (measured on the subset)" if extrapolated else "")),
        (f"time on the common {k} conversations (s)", f"{ours['subset_seconds']:.1f}", f"{sum(ref['seconds']):.1f}"),
        ("peak memory (MiB)", f"{ours['memory']['peak_mib']:.0f}", f"{ref['memory']['peak_mib']:.0f}"),
        ("peak above the loaded model (MiB)", f"{ours['memory']['above_model_mib']:.0f}",
         f"{ref['memory']['above_model_mib']:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"| {'':{width}} | ours | reference |")
    print(f"|{'-' * (width + 2)}|------|-----------|")
    for name, a, b in rows:
        print(f"| {name:{width}} | {a} | {b} |")
    ratio = ref_total / ours["seconds"]
    subset_ratio = sum(ref["seconds"]) / ours["subset_seconds"]
    print()
    print(f"throughput ratio ({n} conversations{', reference extrapolated' if extrapolated else ''}): "
          f"{ratio:.1f}x   (target >= 4x)")
    print(f"throughput ratio on the common {k} conversations (both measured): {subset_ratio:.1f}x")
    print(f"max |Δscore| over the {len(deltas)} turns scored by both: {delta:.2e}   (target <= 1e-4)")
    result = {"n": n, "reference_n": k, "device": args.device, "dtype": args.dtype, "sdpa_kernels": ours["sdpa_kernels"], "layer": ours["layer"],
              "tokens_mean": statistics.mean(tokens), "ours_seconds": ours["seconds"],
              "ours_subset_seconds": ours["subset_seconds"], "reference_seconds_each": ref["seconds"],
              "reference_seconds_total": ref_total, "reference_extrapolated": extrapolated,
              "throughput_ratio": ratio, "subset_ratio": subset_ratio, "max_abs_delta": delta,
              "turns_compared": len(deltas), "ours_memory": ours["memory"], "reference_memory": ref["memory"]}

    if not args.skip_memory:
        peaks = {}
        for length in [int(x) for x in args.memory_lengths.split(",")]:
            peaks[length] = p = _child("memory", args, tokens=length)
            print(f"ours on one conversation of {p['tokens']:>5} tokens: peak {p['peak_mib']:7.0f} MiB "
                  f"(above the loaded model {p['above_model_mib']:6.0f} MiB), {p['seconds']:.1f} s", flush=True)
        lo, hi = min(peaks), max(peaks)
        mem_ratio = peaks[hi]["peak_mib"] / peaks[lo]["peak_mib"]
        print(f"peak memory {peaks[hi]['tokens']} vs {peaks[lo]['tokens']} tokens: {mem_ratio:.2f}x   (target <= 2x)")
        result.update(memory_probe=peaks, memory_ratio=mem_ratio)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
