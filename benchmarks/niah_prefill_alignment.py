"""What exact prefix reuse costs: prompt tokens the NIH engine prefills on the quick grid, side by side, when a
cached prefix is reused wherever it ends (before issue 26: answers then depended on the cell before) or only in
whole chunks aligned to multiples of --prefill-chunk (now: a cell's cache is bit for bit the one it computes alone).
Counts tokens from the tokenizer alone (no model run), in the engine's order::

    python benchmarks/niah_prefill_alignment.py
"""

from __future__ import annotations

from ctxaware.models import load_tokenizer
from ctxaware.niah import NiahConfig
from ctxaware.niah.haystack import Haystack, read_haystack
from ctxaware.niah.needles import load_needle
from ctxaware.niah.prompts import build_prompt
from ctxaware.chat.render import common_prefix

tok = load_tokenizer(None)
cfg = NiahConfig()
needle = load_needle(cfg.needle)
hay = Haystack(read_haystack("builtin"), tok)
prompts = []
for L in cfg.grid_lengths():
    for d in cfg.grid_depths():
        place = hay.place_task(needle, L, d, reserve=cfg.reserve)
        for m in cfg.modes:
            p = build_prompt(tok, place.text, needle, m)
            prompts.append((p.steer, list(p.rendered.input_ids)))
prompts.sort()
total = sum(len(ids) for _, ids in prompts)
for name, chunk in (("crop anywhere", None), ("aligned 1024", 1024), ("aligned 256", 256), ("aligned 128", 128)):
    prev, prev_steer, n = [], None, 0
    for steer, ids in prompts:
        keep = common_prefix(prev, ids) if steer == prev_steer else 0
        keep = min(keep, len(ids) - 1)
        if chunk:
            keep = keep // chunk * chunk
        n += len(ids) - keep
        prev, prev_steer = ids, steer
    print(f"{name:14s}: {n} of {total} prompt tokens prefilled ({n / total:.3f})")
