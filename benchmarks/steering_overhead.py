"""Steering overhead: ctxaware's steered attention vs unsteered SDPA vs the reference (eager + mask hook).

On the embedded model (or ``--model``), for chat prompts of each ``--lengths`` token count (a long
document in the user turn, steered toward it), one run is a prefill plus ``--new-tokens`` greedy
decoding steps with the KV cache. Rows:

* ``plain``     — unsteered, ``sdpa`` (the model as loaded);
* ``steered``   — ``ctxaware.steering.steer`` on top of ``sdpa`` (``ctxaware_sdpa``: prefill through
  SDPA's fused causal kernel with one extra q/k channel, decode with a ``(B, H, 1, T)`` bias);
* ``eager-hook`` — the reference approach: eager attention, and a forward pre-hook on every
  attention module that adds ``log(alpha)`` to the additive mask, materialising a per-head
  ``(B, H, Tq, Tk)`` mask (not in place, so no compounding: the same math as ``steered``);
* optional ``plain-eager`` and ``steered-eager`` (``--rows``).

Every (row, length, repeat) runs in a fresh subprocess with glibc's default allocator settings
(what users get): those runs give the times. Peak RSS comes from one more child per (row, length)
run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=131072``, unless
``--default-malloc``): ``VmHWM``, reset after model load and warm-up where the kernel allows, else
``ru_maxrss``. With the default dynamic threshold freed tensors stay in the heap and the peak RSS
of one and the same row varies by about ±5 % from run to run; fixed, it is the peak of live memory
and repeatable to the MiB. The fixed threshold is not used for timing: every large tensor is then
a fresh ``mmap`` whose pages fault in, which made prefill ~30 % slower (5.8 s -> 7.4 s at 2k tokens
in fp32) and taxed the row with more allocations more, so it is not what a user's process sees.
Rows are interleaved within each repeat and the fastest repeat is kept, which damps the
noise of a shared machine. Columns: tokens/s = (prompt + new tokens) / wall time, its ratio to
``plain``, the same ratio in CPU time (``time.process_time``; with ``--threads 1`` it does not see
the time slices other processes take on a shared machine), peak RSS and its overhead over
``plain``. The greedy tokens of every steered row are compared with each other (same
math ⇒ same tokens). Prints a markdown table and writes JSON to ``--out``.

    python benchmarks/steering_overhead.py                                   # 1k, 2k, 4k, 8k; 1 repeat
    python benchmarks/steering_overhead.py --lengths 1024,4096 --repeats 3 --out steer.json
    python benchmarks/steering_overhead.py --device cuda --dtype bfloat16 --model DIR   # on a GPU
    python benchmarks/steering_attention_call.py --lengths 2048,4096,8192   # one attention call (its own script)

Each row also reports the SDPA kernel its prefill and decode attention calls are eligible for
(``ctxaware.attention.kernels.kernel_for`` on the shapes that path hands to SDPA: ``flash``,
``efficient``, ``math``; ``flex`` where the steered prefill goes through compiled flex_attention;
``eager`` for the eager rows) and, on CUDA, the peak CUDA memory. ``--attention-path flex|sdpa``
forces the steered path (``CTXAWARE_ATTENTION_PATH`` in the children). The load average
(``os.getloadavg``) before and after every run is recorded, since on a shared machine other
processes' load is part of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("plain", "steered", "eager-hook", "plain-eager", "steered-eager")
DEFAULT_ROWS = ("plain", "steered", "eager-hook")
QUESTION = "What is the main point of the document?"
SYSTEM = "You are a helpful assistant."


# ----------------------------------------------------------------------------- child side
def _proc_status(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_prompt(tokenizer, length: int):
    """A rendered chat (system + user with a document + question) of exactly ``length`` tokens."""
    from ctxaware.chat import render
    from ctxaware.niah.haystack import read_haystack

    doc_ids = tokenizer(read_haystack("builtin").text, add_special_tokens=False)["input_ids"]
    while len(doc_ids) < length:
        doc_ids = doc_ids + doc_ids

    def chat(n: int):
        doc = tokenizer.decode(doc_ids[:n])
        user = f"Read the document and answer the question.\n\n{doc}\n\nQuestion: {QUESTION}"
        return render(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                      add_generation_prompt=True)

    overhead = len(chat(1)) - 1
    n = max(1, length - overhead)
    best = None
    for _ in range(8):  # re-tokenisation at the cut can shift the count by a token or two
        rendered = chat(n)
        if best is None or abs(len(rendered) - length) < abs(len(best) - length):
            best = rendered
        if len(rendered) == length:
            break
        n = max(1, n + length - len(rendered))
    return best


def _mask_hook(plan_bias, head_scale):
    """Forward pre-hook adding ``head_scale[h] · bias[b, k]`` to the additive eager mask, per head."""
    import torch

    def hook(module, args, kwargs):
        if "attention_mask" not in kwargs:
            raise RuntimeError(f"{type(module).__name__} got its attention mask positionally; the hook needs it "
                               "as a keyword argument")
        mask = kwargs.get("attention_mask")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        tq = hidden.shape[1]
        tk = mask.shape[-1] if mask is not None else tq
        dev = hidden.device
        bias = plan_bias(tk).to(dev)  # (B, Tk) float32
        per_head = head_scale.to(dev).view(1, -1, 1, 1) * bias[:, None, None, :]  # (B, H, 1, Tk)
        if mask is None:
            causal = torch.ones(tq, tk, dtype=torch.bool, device=dev).tril(tk - tq)
            mask = torch.zeros(tq, tk, device=dev).masked_fill(~causal, torch.finfo(torch.float32).min)[None, None]
        kwargs["attention_mask"] = (mask + per_head).to(hidden.dtype)  # materialised (B, H, Tq, Tk)
        return args, kwargs

    return hook


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import DynamicCache

    from ctxaware.attention.functional import key_bias
    from ctxaware.models import load_model
    from ctxaware.steering import SteeringConfig, emphasis_mask, steer

    row = args.child
    eager = row in ("eager-hook", "plain-eager", "steered-eager")
    model, tokenizer = load_model(args.model, attn_implementation="eager" if eager else "sdpa", dtype=args.dtype,
                                  device=args.device)
    device = next(model.parameters()).device
    rendered = build_prompt(tokenizer, args.length)
    warm = build_prompt(tokenizer, 128)
    config = SteeringConfig(alpha=args.alpha, heads=args.heads)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    resolved = config.resolve_heads(n_layers, n_heads)

    def context(r):
        import contextlib

        if row in ("steered", "steered-eager"):
            return steer(model, config, r)
        if row == "eager-hook":
            emph = emphasis_mask(r, config.emphasis_roles)
            log_a = float(torch.log(torch.tensor(args.alpha)))
            stack = contextlib.ExitStack()
            for i, layer in enumerate(model.model.layers):
                if i not in resolved:
                    continue
                scale = torch.zeros(n_heads)
                scale[resolved[i] if resolved[i] is not None else slice(None)] = 1.0
                handle = layer.self_attn.register_forward_pre_hook(
                    _mask_hook(lambda tk, e=emph: key_bias(e, tk, log_a), scale), with_kwargs=True)
                stack.callback(handle.remove)
            return stack
        return contextlib.nullcontext()

    def run(r, new_tokens: int):
        ids = torch.tensor([r.input_ids], device=device)
        with context(r), torch.inference_mode():
            cache = DynamicCache(config=model.config)
            c0, t0 = time.process_time(), time.perf_counter()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            toks = [int(nxt)]
            for _ in range(new_tokens - 1):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(nxt))
            t2, c2 = time.perf_counter(), time.process_time()
        return t1 - t0, t2 - t1, c2 - c0, toks

    run(warm, 3)
    rss_before = _proc_status("VmRSS")
    reset = _reset_peak_rss()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode, cpu, toks = run(rendered, args.new_tokens)
    if cuda:
        torch.cuda.synchronize()
    total = prefill + decode
    kernels = _kernels(model, row, len(rendered), device)
    return {"row": row, "length": len(rendered), "requested_length": args.length, "new_tokens": args.new_tokens,
            "seconds": total, "prefill_s": prefill, "decode_s": decode, "cpu_seconds": cpu,
            "tokens_per_s": (len(rendered) + args.new_tokens) / total,
            "decode_tokens_per_s": (args.new_tokens - 1) / decode if decode > 0 else None,
            "peak_rss_mib": _peak_rss_mib(), "rss_after_load_mib": rss_before, "peak_reset": reset,
            "peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(device),
            "prefill_kernel": kernels[0], "decode_kernel": kernels[1], "tokens": toks}


def _kernels(model, row: str, length: int, device) -> tuple[str, str]:
    """The SDPA kernel the row's prefill and decode attention calls are eligible for (from their shapes)."""
    import torch

    from ctxaware.attention.functional import channel_parts, padded_width
    from ctxaware.attention.kernels import HALF, kernel_for

    if row in ("eager-hook", "plain-eager", "steered-eager"):
        return "eager", "eager"
    cfg = model.config
    h, h_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    dtype = next(model.parameters()).dtype
    gqa = h != h_kv
    if row == "plain":  # transformers: is_causal prefill, no mask; decode without a mask
        pre = kernel_for((1, h, length, d), (1, h_kv, length, d), (1, h_kv, length, d), dtype, device, enable_gqa=gqa)
        dec = kernel_for((1, h, 1, d), (1, h_kv, length, d), (1, h_kv, length, d), dtype, device, enable_gqa=gqa)
        return pre, dec
    w = padded_width(d, dtype, device.type)
    assert w - d >= channel_parts(d, dtype, device.type)
    gqa_kept = gqa and not (device.type == "cuda" and dtype not in HALF)
    pre = kernel_for((1, h, length, w), (1, h_kv, length, w), (1, h_kv, length, w), dtype, device, enable_gqa=gqa_kept)
    from ctxaware.attention import flex as FX
    from ctxaware.attention.functional import CHUNK_MIN_SCORES, CHUNK_QUERIES

    path = FX.current_path()  # what functional.flex_wanted decides for this prefill
    if FX.supported(device, dtype) and (path == "flex" or (path == "auto" and pre == "math" and length > CHUNK_QUERIES
                                                            and length * length > CHUNK_MIN_SCORES)):
        pre = "flex" + ("" if not FX.failures() else " (failed: chunked)")
    if dtype in HALF and device.type != "cpu":  # decoding through the padded channels as well (functional.decode_mask_dtype)
        dec = kernel_for((1, h, 1, w), (1, h_kv, length, w), (1, h_kv, length, w), dtype, device, enable_gqa=gqa_kept)
    else:  # a (B, H, 1, T) float mask (float32 for half types on CPU), grouped heads packed as query rows
        dec = kernel_for((1, h_kv, h // h_kv, d), (1, h_kv, length, d), (1, h_kv, length, d), dtype, device,
                         mask="float")
    return pre, dec


# ----------------------------------------------------------------------------- parent side
def _spawn(args: argparse.Namespace, row: str, length: int, fixed_mmap: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", row, "--length", str(length),
           "--new-tokens", str(args.new_tokens), "--alpha", str(args.alpha), "--heads", args.heads,
           "--threads", str(args.threads), "--model", args.model, "--dtype", args.dtype]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    if args.attention_path:
        env["CTXAWARE_ATTENTION_PATH"] = args.attention_path
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    load_before = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {row} @ {length} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), loadavg_before=load_before,
                loadavg_after=os.getloadavg())


def _table(results: list[dict], rows: list[str]) -> str:
    cuda = any(r.get("peak_cuda_mib") is not None for r in results)
    lines = ["| tokens | dtype | row | tokens/s | ratio to plain | CPU-time ratio | prefill s | decode tok/s | "
             "kernel (prefill / decode) | peak RSS MiB | RSS vs plain |" + (" peak CUDA MiB |" if cuda else ""),
             "|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if cuda else "")]
    for r in results:
        lines.append(f"| {r['length']} | {r['dtype']} | {r['row']} | {r['tokens_per_s']:.1f} | {r['ratio']:.3f} | "
                     f"{r['cpu_ratio']:.3f} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_kernel']} / {r['decode_kernel']} | "
                     f"{r['peak_rss_mib']:.0f} | {r['rss_overhead_pct']:+.1f} % |"
                     + (f" {r['peak_cuda_mib']:.0f} |" if cuda else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="model to load (default: the embedded SmolLM2-135M)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded after the prefill")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (row, length); the fastest is kept")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"rows to measure, from {', '.join(ROWS)}")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--heads", default="all", help="head selection of the steered rows (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    ap.add_argument("--device", default=None, help="device to run on, e.g. cuda or cpu (default: the loader's)")
    ap.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 (default: float32)")
    ap.add_argument("--out", default="steering_overhead.json", help="JSON file to write")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's dynamic mmap threshold in the memory runs too (noisier peak RSS)")
    ap.add_argument("--attention-path", choices=("auto", "flex", "sdpa"), default=None,
                    help="force the steered attention path in the children (default: auto)")
    ap.add_argument("--attention-only", action="store_true",
                    help="time one attention call plain vs steered (runs benchmarks/steering_attention_call.py)")
    ap.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.attention_only:  # kept for old commands: the attention-call benchmark is its own script now
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from steering_attention_call import main as attention_call

        return attention_call(["--lengths", args.lengths, "--repeats", str(args.repeats), "--dtype", args.dtype,
                               "--threads", str(args.threads), "--alpha", str(args.alpha),
                               "--paths", "plain,channels"] + (["--device", args.device] if args.device else []))

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or "plain" not in rows:
        ap.error(f"--rows must include plain and only use {', '.join(ROWS)} (got {args.rows})")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    results: list[dict] = []
    load_start = os.getloadavg()
    for length in lengths:
        best: dict[str, dict] = {}
        runs: dict[str, list[float]] = {r: [] for r in rows}
        cpu: dict[str, list[float]] = {r: [] for r in rows}
        for rep in range(args.repeats):
            for row in rows:
                t0 = time.perf_counter()
                res = _spawn(args, row, length)
                runs[row].append(res["seconds"])
                cpu[row].append(res["cpu_seconds"])
                print(f"  {length:>6} {row:<13} rep {rep + 1}: {res['seconds']:.2f} s "
                      f"(prefill {res['prefill_s']:.2f} s, CPU {res['cpu_seconds']:.2f} s), "
                      f"load {res['loadavg_before'][0]:.2f} -> "
                      f"{res['loadavg_after'][0]:.2f} "
                      f"[{time.perf_counter() - t0:.0f} s with load]", file=sys.stderr, flush=True)
                if row not in best or res["seconds"] < best[row]["seconds"]:
                    best[row] = res
        for row in rows:  # peak memory: one run per row under the fixed mmap threshold (see the docstring)
            mem = _spawn(args, row, length, fixed_mmap=not args.default_malloc)
            print(f"  {length:>6} {row:<13} memory run: peak RSS {mem['peak_rss_mib']:.0f} MiB", file=sys.stderr,
                  flush=True)
            best[row].update(peak_rss_mib=mem["peak_rss_mib"], rss_after_load_mib=mem["rss_after_load_mib"],
                             peak_reset=mem["peak_reset"], peak_cuda_mib=mem["peak_cuda_mib"])
        plain = best["plain"]
        steered_tokens = {r: best[r]["tokens"] for r in rows if r in ("steered", "eager-hook", "steered-eager")}
        for row in rows:
            r = best[row]
            r["all_seconds"], r["all_cpu_seconds"] = runs[row], cpu[row]
            r["ratio"] = r["tokens_per_s"] / plain["tokens_per_s"]
            r["cpu_ratio"] = min(cpu["plain"]) / min(cpu[row])  # throughput ratio measured in CPU time
            r["rss_overhead_pct"] = 100.0 * (r["peak_rss_mib"] - plain["peak_rss_mib"]) / plain["peak_rss_mib"]
            if row in steered_tokens:
                r["same_tokens_as_steered_rows"] = all(t == r["tokens"] for t in steered_tokens.values())
            results.append(r)

    table = _table(results, rows)
    print(table)
    checks = []
    for length in lengths:
        by = {r["row"]: r for r in results if r["requested_length"] == length}
        if "steered" in by:
            checks.append(f"{length}: steered/plain = {by['steered']['ratio']:.3f} wall, "
                          f"{by['steered']['cpu_ratio']:.3f} CPU time (target >= 0.95), "
                          f"RSS {by['steered']['rss_overhead_pct']:+.1f} % (target <= 5 %)")
            if by["steered"].get("peak_cuda_mib") and by["plain"].get("peak_cuda_mib"):
                extra = 100.0 * (by["steered"]["peak_cuda_mib"] / by["plain"]["peak_cuda_mib"] - 1)
                checks[-1] += f", peak CUDA memory {extra:+.1f} % (target <= 10 % at 8k)"
            if "eager-hook" in by:
                speed = by["steered"]["tokens_per_s"] / by["eager-hook"]["tokens_per_s"]
                by["steered"]["speedup_vs_eager_hook"] = speed
                checks[-1] += f", {speed:.2f}x the eager-hook baseline" + (" (target >= 2x)" if length == 4096 else "")
        same = [r.get("same_tokens_as_steered_rows") for r in by.values() if "same_tokens_as_steered_rows" in r]
        if same:
            checks[-1] += f"; steered rows decode the same tokens: {'yes' if all(same) else 'NO'}"
    load_end = os.getloadavg()
    checks.append(f"load average (1/5/15 min) at start {' / '.join(f'{x:.2f}' for x in load_start)}, "
                  f"at end {' / '.join(f'{x:.2f}' for x in load_end)}")
    print()
    print("\n".join(checks))
    import torch
    import transformers

    payload = {"benchmark": "steering_overhead", "model": args.model, "device": args.device, "dtype": args.dtype, "lengths": lengths, "rows": rows,
               "new_tokens": args.new_tokens, "repeats": args.repeats, "alpha": args.alpha, "heads": args.heads,
               "threads": args.threads, "fixed_mmap_threshold_memory_runs": not args.default_malloc,
               "timing_malloc": "glibc default",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "attention_path": args.attention_path or "auto", "loadavg_start": load_start, "loadavg_end": load_end,
               "results": results, "table": table, "checks": checks}
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
