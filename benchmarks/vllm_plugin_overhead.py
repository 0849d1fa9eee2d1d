"""Cost of steering inside vLLM, offline: the same 8-request batch unsteered and steered, one engine.

Prints output tokens/s of each arm (best of --reps, arms alternated so load drifts hit both) and
their ratio; the plugin's target is steered >= 0.9x unsteered. Run in .venv-vllm:

    .venv-vllm/bin/python benchmarks/vllm_plugin_overhead.py --prompt-words 400 --new-tokens 32

(The OpenAI-server numbers at 1 and 8 clients are benchmarks/vllm_steering.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=400, help="words of essay text per prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ctxaware.chat import render
    from ctxaware.models import load_tokenizer
    from ctxaware.steering.config import SteeringConfig
    from ctxaware.vllm.models import embedded_model_dir
    from ctxaware.vllm.request import steering_request

    corpus = Path(__file__).resolve().parents[1] / "src" / "ctxaware" / "niah" / "corpus"
    words = " ".join(p.read_text() for p in sorted(corpus.glob("*.txt"))).split()
    path = embedded_model_dir()
    tok = load_tokenizer(path)
    llm = LLM(path, dtype=args.dtype, max_model_len=4096, enforce_eager=True, seed=0, enable_prefix_caching=False)

    def batch(steered: bool):
        prompts, params = [], []
        for i in range(args.requests):
            doc = " ".join(words[i * args.prompt_words:(i + 1) * args.prompt_words])
            r = render(tok, [{"role": "system", "content": "You answer from the document."},
                             {"role": "user", "content": doc + "\nSummarise the document."}], add_generation_prompt=True)
            sr = steering_request(SteeringConfig(alpha=args.alpha) if steered else None, r)
            p = TokensPrompt(prompt_token_ids=r.input_ids)
            if sr.cache_salt:
                p["cache_salt"] = sr.cache_salt
            prompts.append(p)
            params.append(SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0,
                                         extra_args=sr.extra_args or None))
        return prompts, params

    llm.generate(*batch(False), use_tqdm=False)  # warm-up
    best = {"unsteered": 0.0, "steered": 0.0}
    for rep in range(args.reps):
        for arm in best:
            prompts, params = batch(arm == "steered")
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            best[arm] = max(best[arm], n / dt)
            print(f"rep {rep} {arm:9s} {n / dt:8.2f} output tok/s  ({len(prompts[0]['prompt_token_ids'])}-token "
                  f"prompts, load {os.getloadavg()[0]:.1f})", flush=True)
    ratio = best["steered"] / best["unsteered"]
    print(json.dumps({"unsteered_tok_s": round(best["unsteered"], 2), "steered_tok_s": round(best["steered"], 2),
                      "ratio": round(ratio, 3), "requests": args.requests, "new_tokens": args.new_tokens,
                      "alpha": args.alpha, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
