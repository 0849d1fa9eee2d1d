"""Exactness of ctxaware's vLLM plugin on vLLM's CPU build (run in .venv-vllm; skipped where vLLM is absent).

Every vLLM engine runs in its own subprocess (tests/vllm_runner.py, in-process engine core, its own
session) under a timeout, and the whole process group is killed afterwards, so no EngineCore or
worker survives a test. References are ctxaware's own steered model (``steer()``, transformers,
fp32) on the same prompt; the tolerance is the plain-vLLM-vs-plain-transformers difference measured
in the same test (times a small factor), and each test also checks steering moved the numbers by
far more than that tolerance, so it can fail.

Run: ``.venv-vllm/bin/python -m pytest -q tests/test_vllm_plugin.py``
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CTXAWARE_REQUIRE_VLLM"):  # CI: a missing vLLM is a failure, not a skip
        raise RuntimeError("CTXAWARE_REQUIRE_VLLM is set but vLLM is not importable here")
    pytest.skip("vLLM is not installed (bash scripts/setup_vllm.sh makes .venv-vllm)", allow_module_level=True)

RUNNER = Path(__file__).with_name("vllm_runner.py")
TIMEOUT = int(os.environ.get("CTXAWARE_VLLM_TEST_TIMEOUT", "420"))
DOC = ("Notes from the archive. The old lighthouse on the northern cape was painted blue in 1931. "
       "The ferry to the island leaves at seven every morning. The secret code for the storage room is 4471. "
       "Fishermen say the best bait is fresh squid.")
A = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
     {"role": "user", "content": f"{DOC}\n\nQuestion: what is the secret code for the storage room?"}]
B = [{"role": "user", "content": f"Read this: {DOC} When does the ferry leave?"}]
C = [{"role": "system", "content": "Be concise."},
     {"role": "user", "content": f"Here is a document. {DOC}"},
     {"role": "assistant", "content": "Thank you, I have read the document about the cape and the island."},
     {"role": "user", "content": "What colour was the lighthouse painted?"}]


def run_vllm(tmp_path: Path, job: dict) -> list:
    """Run one job in a fresh session; kill its whole process group whatever happens."""
    job_file, out_file = tmp_path / f"job-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json", tmp_path / "out.json"
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(job_file), str(out_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        log = b"(timed out)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if not out_file.is_file():
        pytest.fail(f"vLLM run failed (rc {proc.returncode}):\n" + log.decode(errors="replace")[-4000:])
    return json.loads(out_file.read_text())


def req(messages, steering=None, max_tokens=1, **kw):
    return {"messages": messages, "steering": steering, "max_tokens": max_tokens, **kw}


@pytest.fixture(scope="module")
def model_dir():
    from ctxaware.vllm.models import embedded_model_dir

    try:
        return embedded_model_dir()
    except Exception as exc:
        if os.environ.get("CTXAWARE_REQUIRE_VLLM"):
            raise
        pytest.skip(f"embedded model unavailable: {exc}")


@pytest.fixture(scope="module")
def hf(model_dir):
    from ctxaware.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    return model, tok


def hf_logprobs(hf, messages, steering=None, generated=()):
    """Log-probs (float64) of every position after the prompt (prompt + generated tokens, teacher forced)."""
    from ctxaware.chat import render
    from ctxaware.steering import SteeringConfig, steer

    model, tok = hf
    r = render(tok, messages, add_generation_prompt=True)
    ids = torch.tensor([list(r.input_ids) + list(generated)])
    with torch.no_grad():
        if steering is None:
            logits = model(ids).logits
        else:
            with steer(model, SteeringConfig.from_dict(steering), r):
                logits = model(ids).logits
    return torch.log_softmax(logits[0, len(r.input_ids) - 1:].double(), -1)


def top_diff(result, ref):
    return max(abs(v - ref[int(t)].item()) for t, v in result["top"].items())


ENGINE = {"max_model_len": 1024, "enable_prefix_caching": True, "block_size": 32}  # small blocks: short prompts cache
MIXED = [req(A, {"alpha": 0.5}, 12), req(B), req(B, {"alpha": 0.8}), req(C, {"alpha": 0.6}, 12), req(A),
         req(C, {"alpha": 0.5, "heads": "0-9"}), req(C)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, model_dir):
    """One engine with prefix caching: the mixed batch, then cache-order phases on prompt A."""
    tmp = tmp_path_factory.mktemp("vllm-mixed")
    phases = [MIXED,
              [req(A, max_tokens=4)],                     # 1: plain A, after steered A ran (blocks cached)
              [req(A, {"alpha": 0.5}, 12)],               # 2: the same steering again: reuses its blocks
              [req(A, {"alpha": 0.7})],                   # 3: another steering: no reuse
              [req(A, {"alpha": 0.5}, 1, salt="alpha-one",
                   extra_args={"ctxaware_alpha": 1.0})],  # 4: the steered path forced with alpha 1
              [req(B, extra_args={"ctxaware_spans": [0, 3]})]]  # 5: malformed: refused up front
    return run_vllm(tmp, {"model": model_dir, "engine": ENGINE, "phases": phases})


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, model_dir):
    """vLLM as installed without ctxaware (its entry points hidden): the mixed batch's unsteered requests."""
    tmp = tmp_path_factory.mktemp("vllm-base")
    plain = [r for r in MIXED if r["steering"] is None]
    return run_vllm(tmp, {"model": model_dir, "plugin": False, "phases": [plain, [req(A, max_tokens=4)]],
                          "engine": ENGINE})


def test_unsteered_is_vllm_without_plugin(mixed, baseline):
    ours = [o for o, r in zip(mixed[0], MIXED) if r["steering"] is None]
    assert len(ours) == len(baseline[0]) == 3
    for a, b in zip(ours, baseline[0]):
        assert a["ids"] == b["ids"] and a["steps"] == b["steps"] and a["top"] == b["top"]  # bit for bit
    # plain A after a steered A with the same prompt: untouched, and never served from the steered blocks
    assert mixed[1][0]["ids"] == baseline[1][0]["ids"] and mixed[1][0]["steps"] == baseline[1][0]["steps"]


def test_steered_first_token_matches_ctxaware(mixed, hf):
    tol_plain = max(top_diff(o, hf_logprobs(hf, r["messages"])[0]) for o, r in zip(mixed[0], MIXED)
                    if r["steering"] is None)
    tol = max(4 * tol_plain, 1e-4)
    for o, r in zip(mixed[0], MIXED):
        if r["steering"] is None:
            continue
        ref = hf_logprobs(hf, r["messages"], r["steering"])[0]
        plain = hf_logprobs(hf, r["messages"])[0]
        moved = max(abs(ref[int(t)] - plain[int(t)]).item() for t in o["top"])
        assert top_diff(o, ref) <= tol, (r["steering"], top_diff(o, ref), tol)
        assert moved > 20 * tol, (r["steering"], moved, tol)  # steering really changed these numbers


def test_every_decode_step_matches_ctxaware(mixed, hf):
    for o, r in zip(mixed[0], MIXED):
        if r["steering"] is None or r["max_tokens"] < 2:
            continue
        ref = hf_logprobs(hf, r["messages"], r["steering"], o["ids"][:-1])
        want = [ref[i, t].item() for i, t in enumerate(o["ids"])]
        assert max(abs(a - b) for a, b in zip(o["steps"], want)) < 5e-4
        assert [int(ref[i].argmax()) for i in range(len(o["ids"]))] == o["ids"]  # greedy agrees


def test_prefix_cache_keyed_by_steering(mixed):
    first = mixed[0][0]
    again = mixed[2][0]
    assert again["cached"] > 0, "the same steering on the same prompt should reuse its cached blocks"
    assert again["ids"] == first["ids"] and max(abs(a - b) for a, b in zip(again["steps"], first["steps"])) < 1e-5
    assert mixed[3][0]["cached"] == 0  # another alpha: its own salt
    assert mixed[1][0]["cached"] > 0  # plain A reuses plain blocks (request 4 of the mixed batch), not steered


def test_alpha_one_on_the_steered_path_is_identity(mixed):
    plain_a = mixed[0][4]
    forced = mixed[4][0]
    assert forced["ids"] == plain_a["ids"][:1]
    # the recomputed rows sum in another order than the C++ kernel: fp32 rounding through 30 layers only
    assert max(abs(v - plain_a["top"][t]) for t, v in forced["top"].items()) < 1e-4


def test_malformed_extra_args_refused(mixed):
    assert "error" in mixed[5] and "ctxaware" in mixed[5]["error"] and "ctxaware_alpha" in mixed[5]["error"]


def test_chunked_prefill_short_chunks(tmp_path, model_dir, hf):
    """Prompts prefilled 16 tokens at a time (and prefix caching on): steered rows still exact."""
    reqs = [req(A, {"alpha": 0.5}, 6), req(C, {"alpha": 0.6}), req(B)]
    out = run_vllm(tmp_path, {"model": model_dir, "phases": [reqs], "engine": {
        "max_model_len": 1024, "enable_prefix_caching": True, "enable_chunked_prefill": True,
        "max_num_batched_tokens": 16, "max_num_seqs": 4}})[0]
    assert all(len(r["prompt"]) > 48 for r in out)  # several chunks each
    tol_plain = top_diff(out[2], hf_logprobs(hf, B)[0])
    tol = max(4 * tol_plain, 1e-4)
    for o, r in zip(out[:2], reqs[:2]):
        ref = hf_logprobs(hf, r["messages"], r["steering"], o["ids"][:-1])
        assert top_diff(o, ref[0]) <= tol
        assert max(abs(a - ref[i, t].item()) for i, (a, t) in enumerate(zip(o["steps"], o["ids"]))) < 5e-4


def test_sliding_window_softcap_gqa_tiny_gemma2(tmp_path):
    """A random 2-layer Gemma-2 (GQA 4/2 heads; layer 0 a 24-token sliding window < the prompt; softcap 5)."""
    from ctxaware.models import load_model
    from ctxaware.vllm.models import tiny_model_dir

    path = tiny_model_dir("gemma2")
    reqs = [req(A, {"alpha": 0.3}, 6), req(A)]
    out = run_vllm(tmp_path, {"model": path, "phases": [reqs], "engine": {"max_model_len": 512, "block_size": 32}})[0]
    assert len(out[0]["prompt"]) > 3 * 24
    model = load_model(path, dtype="float32", device="cpu", attn_implementation="eager")
    tiny = (model.model, model.tokenizer)
    plain_diff = top_diff(out[1], hf_logprobs(tiny, A)[0])
    assert plain_diff < 1e-4  # vLLM and transformers agree on the window itself
    tol = max(4 * plain_diff, 1e-5)
    ref = hf_logprobs(tiny, A, {"alpha": 0.3}, out[0]["ids"][:-1])
    assert top_diff(out[0], ref[0]) <= tol
    assert max(abs(a - ref[i, t].item()) for i, (a, t) in enumerate(zip(out[0]["steps"], out[0]["ids"]))) <= 10 * tol
    plain = hf_logprobs(tiny, A)[0]
    assert max(abs(ref[0, int(t)] - plain[int(t)]).item() for t in out[0]["top"]) > 20 * tol
