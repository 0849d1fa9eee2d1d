"""benchmarks/gpu_steering.py --smoke: the GPU run's script works end to end on CPU (tiny shapes).

It builds the models on the device, times plain vs steered prefill and decoding, profiles, and
checks exactness against float64; its rows are written as JSONL and a Markdown table, fp32 steering
is exact to plain attention's own error, and the attention functions it counts are restored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from test_measure_models import one_thread  # noqa: F401  (autouse: one torch thread)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_smoke_run_end_to_end(tmp_path):
    import gpu_steering

    from ctxaware.attention import functional as AF
    from ctxaware.attention import thin as TH

    before = (TH.attention, AF.sdpa_key_bias)
    rc = gpu_steering.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--models", "llama-1b,gemma3-1b",
                            "--lengths", "128,1024", "--decode-tokens", "2"])
    assert rc == 0
    assert (TH.attention, AF.sdpa_key_bias) == before
    rows = [json.loads(line) for line in (tmp_path / "gpu_steering.jsonl").read_text().splitlines()]
    bench = [r for r in rows if "prefill_ratio" in r]
    exact = [r for r in rows if r.get("check") == "exactness"]
    assert {(r["model"], r["T"] > 900) for r in bench} == {(m, big) for m in ("llama-1b", "gemma3-1b")
                                                             for big in (False, True)}
    for r in bench:
        assert r["prefill_ratio"] > 0 and r["decode_ratio"] > 0 and r["steered_calls"]
        assert r["kernels_steered"]["attention"]  # the profiler saw the attention ops
    assert {r["alpha"] for r in exact} == {0.95, 0.5, 0.1} and len(exact) == 6
    for r in exact:
        assert r["steer_effect"] > 10 * r["fp32_plain_err"]
        assert r["fp32_steered_err"] <= 3 * r["fp32_plain_err"] + 1e-7
        assert r["bf16_steered_err"] < 0.1
    llama = [r for r in exact if r["model"] == "llama-1b" and r["alpha"] >= 0.5]
    assert all(r["fp32_steered_calls"].get("thin") for r in llama)  # the 1k prompt went through the correction
    assert llama[0]["alpha"] == 0.95 and llama[0]["bf16_steered_calls"].get("thin")  # bf16 from alpha 0.8
    assert not any(r["bf16_steered_calls"].get("thin") for r in exact if r["alpha"] < 0.8)
    assert rows[-1]["lse_ops"] and "| llama-1b |" in (tmp_path / "gpu_steering.md").read_text()
