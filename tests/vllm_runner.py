"""Subprocess side of the vLLM tests: run phases of requests through ``vllm.LLM``, print JSON results.

Usage (from tests/test_vllm_plugin.py): ``python tests/vllm_runner.py JOB.json OUT.json``. The job
names the model, the engine options, whether ctxaware's plugin is visible (``"plugin": false``
hides ctxaware's entry points from this process, i.e. vLLM as installed without ctxaware), and
``phases``: lists of requests run one ``generate`` call after another (so prefix-cache order is
controlled). A request is ``{"messages", "steering" (SteeringConfig dict or null), "max_tokens",
"extra_args" (overrides), "salt"}``. Each result: generated ids, per-step logprob of the chosen token,
the first step's top logprobs, and ``num_cached_tokens``.
"""

from __future__ import annotations

import json
import os
import sys


def _hide_ctxaware_entry_points() -> None:
    import importlib.metadata as md

    real = md.entry_points

    def entry_points(**kw):
        eps = real(**kw)
        if kw.get("group") in ("vllm.general_plugins", "vllm.logits_processors"):
            return md.EntryPoints([e for e in eps if not e.value.startswith("ctxaware.")])
        return eps

    md.entry_points = entry_points


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: no EngineCore child to leak
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not job.get("plugin", True):
        _hide_ctxaware_entry_points()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ctxaware.chat import render
    from ctxaware.models import load_tokenizer
    from ctxaware.steering.config import SteeringConfig
    from ctxaware.vllm.request import steering_request

    tok = load_tokenizer(job["model"])
    llm = LLM(job["model"], dtype="float32", enforce_eager=True, seed=0, **job.get("engine", {}))
    results = []
    for phase in job["phases"]:
        prompts, params = [], []
        for req in phase:
            r = render(tok, req["messages"], add_generation_prompt=True)
            cfg = None if req.get("steering") is None else SteeringConfig.from_dict(req["steering"])
            sr = steering_request(cfg, r, user_salt=req.get("salt"))
            extra = {**sr.extra_args, **req.get("extra_args", {})}
            p = TokensPrompt(prompt_token_ids=r.input_ids)
            if sr.cache_salt:
                p["cache_salt"] = sr.cache_salt
            prompts.append(p)
            params.append(SamplingParams(max_tokens=req.get("max_tokens", 1), temperature=0, logprobs=5,
                                         extra_args=extra or None))
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # a refused request: report it (the test checks the message)
            results.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        batch = []
        for o in outs:
            c = o.outputs[0]
            steps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
            batch.append({"ids": list(c.token_ids), "steps": steps, "prompt": list(o.prompt_token_ids),
                          "top": {str(t): v.logprob for t, v in c.logprobs[0].items()},
                          "cached": o.num_cached_tokens})
        results.append(batch)
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
