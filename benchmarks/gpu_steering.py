"""Whole-model steering cost and exactness on a GPU, in one process that fits a lent machine's minutes.

Random-weight models of published shapes (Llama-3.2-1B, Llama-3.1-8B, Qwen3-4B, Gemma-3-1B) are
built directly on the device (``torch.device`` context + ``from_config(dtype=...)``: no CPU
initialisation, nothing saved, no child processes). For one rendered chat prompt of about T tokens
per length, steered (``steer(alpha=--alpha)``, all heads, toward the user's turn) against plain:

* prefill time (min of ``--repeats``) and the time of ``--decode-tokens`` greedy decoding steps
  after the prompt (prefill not included, min of 2), as ``plain/steered`` ratios (1.0 = free);
* peak memory above the weights, plain and steered;
* the kernels that ran (``torch.profiler`` names: the attention kernels and any concatenation
  ``cat`` kernels, as % of device time), and how many steered layer calls took the thin correction
  vs the padded channels;
* exactness: last-8-position logits vs a float64 explicit-softmax reference at α ∈ {0.95, 0.5, 0.1}
  in fp32 and bf16, next to plain attention's own error (relative to max |reference|).

``--budget-s`` (default 220) stops starting new measurements once spent, so the run stays within
4 minutes; what was skipped is printed. ``--smoke`` runs tiny versions of the four shapes at short
lengths (on CPU in seconds: the check that the script works before a GPU session spends its minutes).

    python benchmarks/gpu_steering.py --device cuda --tokenizer .gpu/tokenizer --out runs/gpu
    python benchmarks/gpu_steering.py --smoke --device cpu --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

# model_type, layers, hidden, intermediate, heads, kv heads, head_dim, extra config
SHAPES = {
    "llama-1b": ("llama", 16, 2048, 8192, 32, 8, 64, {}),
    "llama-8b": ("llama", 32, 4096, 14336, 32, 8, 128, {}),
    "qwen3-4b": ("qwen3", 36, 2560, 9728, 32, 8, 128, {}),
    "gemma3-1b": ("gemma3_text", 26, 1152, 6912, 4, 1, 256, {"sliding_window": 512}),
}
SMOKE = {
    "llama-1b": ("llama", 2, 64, 128, 4, 2, 16, {}),
    "llama-8b": ("llama", 2, 64, 128, 4, 2, 32, {}),
    "qwen3-4b": ("qwen3", 2, 64, 128, 4, 2, 32, {}),
    "gemma3-1b": ("gemma3_text", 6, 64, 128, 2, 1, 64, {"sliding_window": 64}),
}
ATTN_WORDS = ("flash", "fmha", "attention", "cudnn", "softmax", "flex", "triton", "efficient", "mha", "sdpa")
PARA = ("The committee met on Tuesday to review the river survey, the budget for the library roof, "
        "and a letter from the harbour office about winter moorings. ")


class Run:
    """Device, tokenizer, timing, profiling and the counters of which steered path ran."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from ctxaware.attention import functional as AF
        from ctxaware.attention import thin as TH
        from ctxaware.models import load_tokenizer

        self.torch, self.args = torch, args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.tok = load_tokenizer(args.tokenizer)
        self.t0 = time.monotonic()
        self.paths: Counter = Counter()
        real_thin, real_channels = TH.attention, AF.sdpa_key_bias

        def thin(*a, **kw):
            out = real_thin(*a, **kw)
            self.paths["thin" if out is not None else "thin_refused"] += 1
            return out

        def channels(*a, **kw):
            self.paths["channels"] += 1
            return real_channels(*a, **kw)

        self._restore = lambda: (setattr(TH, "attention", real_thin), setattr(AF, "sdpa_key_bias", real_channels))
        TH.attention, AF.sdpa_key_bias = thin, channels  # counted, not changed (restored by close())

    def close(self) -> None:
        self._restore()

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed(self, fn, reps: int) -> float:
        fn()
        self.sync()
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best

    def peak(self, fn) -> float | None:
        if not self.cuda:
            return None
        torch = self.torch
        self.sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return round((torch.cuda.max_memory_allocated() - base) / 2 ** 30, 3)

    def kernels(self, fn) -> dict:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CUDA] if self.cuda else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            fn()
            self.sync()
        tot: Counter = Counter()
        for e in prof.key_averages():
            t = (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) if self.cuda else \
                e.self_cpu_time_total
            if t:
                tot[e.key] += t
        total = sum(tot.values()) or 1
        pct = {k[:90]: round(100 * v / total, 1) for k, v in tot.most_common()}
        return {"attention": dict([kv for kv in pct.items() if any(w in kv[0].lower() for w in ATTN_WORDS)][:6]),
                "cat": round(sum(v for k, v in pct.items() if "cat" in k.lower()), 1)}

    def build(self, name: str, dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        mt, layers, hidden, inter, heads, kv, hd, extra = (SMOKE if self.args.smoke else SHAPES)[name]
        tok = self.tok
        cfg = AutoConfig.for_model(mt, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
                                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                                   vocab_size=len(tok), max_position_embeddings=65536, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, **extra)
        self.torch.manual_seed(0)
        with self.dev:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
        model.requires_grad_(False)
        return model

    def prompt(self, length: int):
        from ctxaware import render

        per = len(self.tok(PARA, add_special_tokens=False)["input_ids"])
        msgs = [{"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": PARA * max(1, (length - 40) // per) + "Question: what was reviewed?"}]
        chat = render(self.tok, msgs, add_generation_prompt=True)
        return chat, self.torch.tensor([chat.input_ids], device=self.dev)


def bench(run: Run, name: str, lengths: list[int], out: list) -> None:
    from ctxaware import steer

    torch, a = run.torch, run.args
    model = run.build(name, torch.bfloat16)
    for length in lengths:
        if run.left() <= 0:
            out.append({"model": name, "T": length, "skipped": "budget"})
            continue
        row: dict = {"model": name, "T": length, "dtype": "bfloat16", "alpha": a.alpha}
        try:
            chat, ids = run.prompt(length)
            row["T"] = ids.shape[1]

            def plain():
                return model(input_ids=ids, logits_to_keep=1)

            def steered():
                with steer(model, emphasis=chat, alpha=a.alpha):
                    return model(input_ids=ids, logits_to_keep=1)

            with torch.inference_mode():
                row["prefill_plain_s"] = run.timed(plain, a.repeats)
                run.paths.clear()
                row["prefill_steered_s"] = run.timed(steered, a.repeats)
                row["steered_calls"] = {k: v // (a.repeats + 1) for k, v in run.paths.items()}
                row["prefill_ratio"] = round(row["prefill_plain_s"] / row["prefill_steered_s"], 3)
                row["peak_plain_GiB"], row["peak_steered_GiB"] = run.peak(plain), run.peak(steered)
                row["kernels_plain"], row["kernels_steered"] = run.kernels(plain), run.kernels(steered)
                if a.decode_tokens and run.left() > 0:
                    row["decode_plain_s"] = decode(run, model, ids, None)
                    run.paths.clear()
                    row["decode_steered_s"] = decode(run, model, ids, lambda: steer(model, emphasis=chat,
                                                                                     alpha=a.alpha))
                    row["decode_steered_calls"] = dict(run.paths)
                    row["decode_ratio"] = round(row["decode_plain_s"] / row["decode_steered_s"], 3)
        except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        out.append(row)
        print(json.dumps(row), flush=True)
    del model
    if run.cuda:
        torch.cuda.empty_cache()


def decode(run: Run, model, ids, steering) -> float:
    """Seconds of ``--decode-tokens`` greedy steps after a prefill of ``ids`` (min of 2; the prefill
    is not timed): the KV cache is cropped back to the prompt between runs, or rebuilt where it
    cannot be cropped (sliding-window layers)."""
    from contextlib import nullcontext

    n, length = run.args.decode_tokens, ids.shape[1]
    state: dict = {}

    def reset() -> None:
        cache = state.get("cache")
        try:
            if cache is None:
                raise ValueError("no cache yet")
            cache.crop(length)
        except Exception:  # noqa: BLE001 - any cache that cannot be cropped is rebuilt
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            state["cache"], state["next"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

    best = math.inf
    for _ in range(3):  # the first run warms up
        reset()
        run.sync()
        t = time.perf_counter()
        with steering() if steering else nullcontext():
            tok = state["next"]
            for _ in range(n):
                logits = model(input_ids=tok, past_key_values=state["cache"], use_cache=True, logits_to_keep=1).logits
                tok = logits[:, -1:].argmax(-1)
        run.sync()
        best = min(best, time.perf_counter() - t) if "warm" in state else best
        state["warm"] = True
    return best


REF: dict = {"w": None}


def _ref_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    """Explicit softmax in float64, the key weights ``REF["w"]`` multiplied in and renormalised."""
    import torch

    dt = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    t, s = q.shape[2], k.shape[2]
    sc = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if cap:
        sc = torch.tanh(sc / cap) * cap
    i = torch.arange(t, device=q.device)[:, None] + (s - t)
    j = torch.arange(s, device=q.device)[None, :]
    hide = j > i
    window = kw.get("sliding_window") or getattr(module, "sliding_window", None)
    if window:
        hide = hide | (i - j >= window)
    p = torch.softmax(sc.masked_fill(hide, float("-inf")), -1)
    if REF["w"] is not None:
        w = torch.ones(s, dtype=p.dtype, device=p.device)
        n = min(len(REF["w"]), s)
        w[:n] = REF["w"][:n]
        p = p * w
        p = p / p.sum(-1, keepdim=True)
    return (p @ v).to(dt).transpose(1, 2).contiguous(), None


def exactness(run: Run, name: str, length: int, out: list) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from ctxaware import steer

    torch = run.torch
    AttentionInterface.register("ctxaware_f64_reference", _ref_attention)
    AttentionMaskInterface.register("ctxaware_f64_reference", eager_mask)
    model = run.build(name, torch.float32)
    chat, ids = run.prompt(length)

    def last(m):
        return m(input_ids=ids, logits_to_keep=8).logits.double()

    with torch.inference_mode():
        plains = {"float32": last(model)}
        model.set_attn_implementation("ctxaware_f64_reference")
        plain_ref = last(model)
        model.set_attn_implementation("sdpa")
        half = None
        for alpha in (0.95, 0.5, 0.1):
            if run.left() <= 0:
                out.append({"model": name, "check": "exactness", "alpha": alpha, "skipped": "budget"})
                continue
            row = {"model": name, "check": "exactness", "T": ids.shape[1], "alpha": alpha}
            run.paths.clear()
            with steer(model, emphasis=chat, alpha=alpha) as plan:
                steered32 = last(model)
                w = torch.where(plan.emphasis[0].to(run.dev), 1.0, alpha).double()
            row["fp32_steered_calls"] = dict(run.paths)
            model.set_attn_implementation("ctxaware_f64_reference")
            REF["w"] = w
            ref = last(model)
            REF["w"] = None
            model.set_attn_implementation("sdpa")
            if half is None:
                half = run.build(name, torch.bfloat16)
                half.load_state_dict(model.state_dict())
                plains["bfloat16"] = last(half)
            run.paths.clear()
            with steer(half, emphasis=chat, alpha=alpha):
                steered16 = last(half)
            scale = ref.abs().max().item()
            row.update({
                "steer_effect": (ref - plain_ref).abs().max().item() / scale,
                "fp32_steered_err": (steered32 - ref).abs().max().item() / scale,
                "fp32_plain_err": (plains["float32"] - plain_ref).abs().max().item() / scale,
                "bf16_steered_err": (steered16 - ref).abs().max().item() / scale,
                "bf16_plain_err": (plains["bfloat16"] - plain_ref).abs().max().item() / scale,
                "bf16_steered_calls": dict(run.paths),
            })
            out.append(row)
            print(json.dumps(row), flush=True)
    del model, half
    if run.cuda:
        torch.cuda.empty_cache()


def table(rows: list) -> str:
    lines = ["| model | T | prefill plain/steered | decode plain/steered | peak plain / steered GiB | "
             "steered calls | attention kernels plain -> steered | cat % steered |",
             "|---|---:|---:|---:|---|---|---|---:|"]
    for r in rows:
        if "check" in r or "skipped" in r or "error" in r:
            continue
        kp, ks = r["kernels_plain"]["attention"], r["kernels_steered"]["attention"]
        lines.append(f"| {r['model']} | {r['T']} | {r['prefill_ratio']} | {r.get('decode_ratio', '-')} | "
                     f"{r['peak_plain_GiB']} / {r['peak_steered_GiB']} | {r['steered_calls']} | "
                     f"{', '.join(list(kp)[:2])} -> {', '.join(list(ks)[:3])} | {r['kernels_steered']['cat']} |")
    lines += ["", "| model | alpha | steer effect | fp32 steered / plain err | bf16 steered / plain err | "
              "fp32 calls | bf16 calls |", "|---|---:|---:|---|---|---|---|"]
    for r in rows:
        if r.get("check") == "exactness" and "skipped" not in r:
            lines.append(f"| {r['model']} | {r['alpha']} | {r['steer_effect']:.3g} | {r['fp32_steered_err']:.2e} / "
                         f"{r['fp32_plain_err']:.2e} | {r['bf16_steered_err']:.2e} / {r['bf16_plain_err']:.2e} | "
                         f"{r['fp32_steered_calls']} | {r['bf16_steered_calls']} |")
    skipped = [f"{r['model']} {r.get('T', '')} {r.get('alpha', '')}".strip() for r in rows if "skipped" in r]
    errors = [f"{r['model']} {r.get('T', '')}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + ([f"\nskipped (budget): {', '.join(skipped)}"] if skipped else [])
                     + [f"error: {e}" for e in errors])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded one)")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"), help="directory for gpu_steering.jsonl/.md")
    ap.add_argument("--models", default=",".join(SHAPES), help=f"from {', '.join(SHAPES)}")
    ap.add_argument("--lengths", default=None, help="prompt tokens (default 2048,8192,32768; smoke 256,1024)")
    ap.add_argument("--alpha", type=float, default=0.9, help="steering alpha of the timed runs")
    ap.add_argument("--repeats", type=int, default=None, help="timed prefills per path (default 3; smoke 1)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="greedy tokens timed (default 32; smoke 4)")
    ap.add_argument("--exact-length", type=int, default=None, help="prompt tokens of the exactness check "
                                                                    "(default 1024)")
    ap.add_argument("--budget-s", type=float, default=220.0, help="start nothing new after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, short lengths (a CPU dry run)")
    args = ap.parse_args(argv)
    s = args.smoke
    lengths = [int(x) for x in (args.lengths or ("256,1024" if s else "2048,8192,32768")).split(",") if x]
    args.repeats = args.repeats or (1 if s else 3)
    args.decode_tokens = (4 if s else 32) if args.decode_tokens is None else args.decode_tokens
    exact_len = args.exact_length or 1024
    names = [n for n in args.models.split(",") if n]
    if any(n not in SHAPES for n in names):
        ap.error(f"--models takes {', '.join(SHAPES)}")

    run = Run(args)
    try:
        return _main(run, args, names, lengths, exact_len)
    finally:
        run.close()


def _main(run: Run, args: argparse.Namespace, names: list[str], lengths: list[int], exact_len: int) -> int:
    from ctxaware.fsio import JsonlAppender, atomic_write_text

    torch, s = run.torch, args.smoke
    head = (f"# gpu_steering  torch {torch.__version__}  device "
            f"{torch.cuda.get_device_name() if run.cuda else 'cpu'}  smoke={s}")
    print(head, flush=True)
    rows: list = []
    for name in ("llama-1b", "gemma3-1b"):
        if name in names and run.left() > 0:
            try:
                exactness(run, name, exact_len, rows)
            except Exception as exc:  # noqa: BLE001
                rows.append({"model": name, "check": "exactness", "error": f"{type(exc).__name__}: {exc}"[:300]})
                traceback.print_exc()
    for name in names:
        bench(run, name, lengths, rows)
    from ctxaware.attention import fused as FU
    from ctxaware.attention import lse as LS

    notes = {"lse_ops": {f"{k[0]}{'+expand' if k[1] else ''} {k[3]}": v for k, v in LS._STATE.items()},
             "compiled_correction_s": FU.compile_seconds(), "compile_failures": FU.failures(),
             "total_s": round(time.monotonic() - run.t0, 1)}
    text = f"{head}\n\n{table(rows)}\n\n{json.dumps(notes, default=str)}\n"
    print(text, flush=True)
    out = Path(args.out)
    with JsonlAppender(out / "gpu_steering.jsonl") as log:
        log.write_many(rows + [notes])
    atomic_write_text(out / "gpu_steering.md", text)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
