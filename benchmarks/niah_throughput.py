"""NIH throughput: the ctxaware harness vs a plain one-cell-at-a-time loop on the same model and grid.

The plain loop is what a straightforward NIH script does: for every cell it re-reads the haystack
files, re-tokenises them, places the needle, renders the prompt and calls ``model.generate`` with
batch size 1 from scratch (greedy). The harness tokenises the haystack once and reuses the KV cache
of the prompt prefix shared between cells and decodes cells in batches (``ctxaware.niah.engine``).
Both build the identical prompts, so the answers should match; the script prints the wall-time
ratio and the number of identical answers.

Grids (``--grid``; explicit --lengths/--depths/--modes/... override parts of it):

* ``paper-cpu`` (default): the paper's grid shape (even lengths from 200, even depths 0-100 %)
  scaled to a CPU: 6 lengths up to 3000 tokens x 6 depths x modes chat, chat+steer (72 cells,
  about 15 minutes on 2 cores);
* ``quick``: the quick preset's grid (lengths 1000-7000 x 5 depths; add --modes chat to halve it);
* ``tiny``: lengths 400, 800 x depths 0, 50, 100, mode chat, 24 new tokens (a minute or two).

After the timing, the grid's longest cell is prefilled (and decoded one step) once per mode, and the
script prints, per mode, the SDPA kernel its attention calls were eligible for (``sdpa_probe``) and
the peak CUDA memory (on a GPU).

    python benchmarks/niah_throughput.py
    python benchmarks/niah_throughput.py --grid quick --modes chat
    python benchmarks/niah_throughput.py --grid tiny --device cuda --dtype bfloat16 --model DIR   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch

from ctxaware.models import load_model
from ctxaware.niah import NiahConfig, load_needle, read_haystack, run_niah
from ctxaware.niah.haystack import Haystack
from ctxaware.niah.prompts import build_prompt
from ctxaware.niah.runner import steering_config
from ctxaware.steering.model import greedy_generation_config

from sdpa_probe import kernel_summary, peak_memory, recorded_kernels, reset_peak_memory


GRIDS = {
    "paper-cpu": {"lengths": None, "depths": None, "min_length": 200, "max_length": 3000, "num_lengths": 6,
                  "num_depths": 6, "modes": "chat,chat+steer"},
    "quick": {},
    "tiny": {"lengths": "400,800", "depths": "0,50,100", "modes": "chat", "max_new_tokens": 24},
}


def plain_loop(cfg: NiahConfig, model, tokenizer) -> dict[tuple, str]:
    """One cell at a time, nothing reused between cells."""
    answers = {}
    gen_cfg = greedy_generation_config(model, tokenizer, cfg.max_new_tokens)
    for length in cfg.grid_lengths():
        for depth in cfg.grid_depths():
            for mode in cfg.modes:
                needle = load_needle(cfg.needle)
                hay = Haystack(read_haystack(cfg.haystack), tokenizer, cache=False)  # re-read, re-tokenise
                place = hay.place(needle.needle, length, depth, reserve=cfg.reserve)
                prompt = build_prompt(tokenizer, place.text, needle, mode, system=cfg.system,
                                      system_message=cfg.system_message)
                ids = torch.tensor([prompt.rendered.input_ids], device=model.device)
                ctx = contextlib.nullcontext()
                if prompt.steer:
                    from ctxaware.steering import steer

                    ctx = steer(model, steering_config(cfg), prompt.rendered)
                with ctx, torch.inference_mode():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
                answers[(mode, length, depth)] = tokenizer.decode(out[0, ids.shape[1]:],
                                                                  skip_special_tokens=True).strip()
    return answers


def kernel_probe(cfg: NiahConfig, model, tokenizer) -> list[dict]:
    """Prefill + one greedy decoding step of the longest cell (first depth) in every mode: the SDPA
    kernels the calls were eligible for, and the peak CUDA memory of the pass."""
    from transformers import DynamicCache

    from ctxaware.steering import steer

    needle = load_needle(cfg.needle)
    hay = Haystack(read_haystack(cfg.haystack), tokenizer)
    length, depth = max(cfg.grid_lengths()), cfg.grid_depths()[0]
    place = hay.place(needle.needle, length, depth, reserve=cfg.reserve)
    rows = []
    for mode in cfg.modes:
        prompt = build_prompt(tokenizer, place.text, needle, mode, system=cfg.system, system_message=cfg.system_message)
        ids = torch.tensor([prompt.rendered.input_ids], device=model.device)
        ctx = steer(model, steering_config(cfg), prompt.rendered) if prompt.steer else contextlib.nullcontext()
        cache = DynamicCache(config=model.config)
        reset_peak_memory(model.device)
        with ctx, torch.inference_mode():
            with recorded_kernels() as pre:
                out = model(input_ids=ids, use_cache=True, past_key_values=cache, logits_to_keep=1)
            with recorded_kernels() as dec:
                model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), use_cache=True, past_key_values=cache)
        rows.append({"mode": mode, "tokens": ids.shape[1], "prefill": kernel_summary(pre),
                     "decode": kernel_summary(dec), "peak_cuda_mib": peak_memory(model.device)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--haystack", default="builtin")
    ap.add_argument("--needle", default="SF")
    ap.add_argument("--lengths", default=None, help="default: from --grid")
    ap.add_argument("--depths", default=None, help="default: from --grid")
    ap.add_argument("--max-length", type=int, default=None, help="with --num-lengths: an even grid from --min-length")
    ap.add_argument("--min-length", type=int, default=None)
    ap.add_argument("--num-lengths", type=int, default=None)
    ap.add_argument("--num-depths", type=int, default=None, help="evenly spaced depths 0..100 (instead of --depths)")
    ap.add_argument("--modes", default=None, help="default: from --grid")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="harness decoding batch (default: the preset's)")
    ap.add_argument("--grid", choices=tuple(GRIDS), default="paper-cpu", help="base grid (see the module doc)")
    ap.add_argument("--device", default=None, help="cuda / mps / cpu (default: load_model's: CUDA, then MPS, else CPU)")
    ap.add_argument("--dtype", default="auto", help="weights dtype (default: auto = bfloat16 where the hardware "
                    "computes it fast, else float32)")
    args = ap.parse_args()
    over = {k: v for k, v in dict(lengths=args.lengths, depths=args.depths, modes=args.modes,
                                  max_length=args.max_length, min_length=args.min_length,
                                  num_lengths=args.num_lengths, num_depths=args.num_depths,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size).items()
            if v is not None}
    if args.num_lengths is not None or args.max_length is not None:
        over.setdefault("lengths", None)  # an even grid instead of explicit lengths
    if args.num_depths is not None:
        over.setdefault("depths", None)
    over = {**GRIDS[args.grid], **over}
    torch.set_grad_enabled(False)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    with tempfile.TemporaryDirectory() as out:
        cfg = NiahConfig(model=args.model, haystack=args.haystack, needle=args.needle, out=out, progress=False,
                         **over)
        cells = len(cfg.grid_lengths()) * len(cfg.grid_depths()) * len(cfg.modes)
        print(f"grid: lengths {cfg.grid_lengths()} x depths {cfg.grid_depths()} x modes {cfg.modes} "
              f"= {cells} cells, max_new_tokens {cfg.max_new_tokens}, threads {torch.get_num_threads()}, "
              f"{model.device} {model.dtype}")
        t0 = time.perf_counter()
        plain = plain_loop(cfg, model, tok)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = run_niah(cfg, model=model, tokenizer=tok, plot=False)
        t_harness = time.perf_counter() - t0
    same = sum(plain[(r["mode"], r["length"], r["depth"])] == r["answer"] for r in run.records)
    prompt_tokens = sum(r["tokens"] for r in run.records)
    print(f"plain loop : {t_plain:8.1f} s  ({prompt_tokens / t_plain:6.0f} prompt tok/s)")
    print(f"harness    : {t_harness:8.1f} s  ({prompt_tokens / t_harness:6.0f} prompt tok/s)")
    print(f"speed-up   : {t_plain / t_harness:.2f}x   identical answers: {same}/{len(run.records)}")
    for r in run.records:
        other = plain[(r["mode"], r["length"], r["depth"])]
        if other != r["answer"]:
            print(f"  differs at {r['mode']} L={r['length']} d={r['depth']}: {r['answer']!r} vs {other!r}")
    print("\n| mode | tokens | prefill SDPA kernel | decode SDPA kernel | peak CUDA MiB |\n|---|---:|---|---|---:|")
    for row in kernel_probe(cfg, model, tok):
        mib = f"{row['peak_cuda_mib']:.0f}" if row["peak_cuda_mib"] is not None else "—"
        print(f"| {row['mode']} | {row['tokens']} | {row['prefill']} | {row['decode']} | {mib} |")


if __name__ == "__main__":
    main()
