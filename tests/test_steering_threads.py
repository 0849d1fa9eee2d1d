"""Steering plans are per thread: two threads steering ONE model concurrently each get their own result.

Plans live in a ContextVar and the implementation switch is reference-counted, so concurrent
``steer()`` blocks with different emphasis and alpha (and an unsteered thread beside them) see
exactly what each would see alone. Float64 tiny model: results must be identical, not close.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ctxaware.attention import backend
from ctxaware.steering import SteeringConfig, steer
from test_steering import one_thread, rendered, tiny_tokenizer  # noqa: F401
from test_steering import tiny_model as _tiny_model

ITERATIONS = 25


def tiny_model64(impl: str = "sdpa"):
    return _tiny_model("llama", impl).to(torch.float64)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _run_threads(jobs):
    """Run each ``job(i)`` in its own thread ITERATIONS times, barrier-synchronised; re-raise errors."""
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def worker(job):
        try:
            for i in range(ITERATIONS):
                barrier.wait(timeout=60)
                job(i)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_two_threads_steering_one_model_equal_their_single_threaded_logits(impl):
    model, tok = tiny_model64(impl), tiny_tokenizer()
    r = rendered(tok, 0)
    emph_a = torch.zeros(1, len(r), dtype=torch.bool)
    emph_a[0, : len(r) // 2] = True
    emph_b = ~emph_a
    cfg_a, cfg_b = SteeringConfig(alpha=0.2), SteeringConfig(alpha=0.7, heads="1:0,3;2")
    plain = _logits(model, r.input_ids)
    with steer(model, cfg_a, emph_a):
        want_a = _logits(model, r.input_ids)
    with steer(model, cfg_b, emph_b):
        want_b = _logits(model, r.input_ids)
    assert (want_a - want_b).abs().max() > 1e-2 and (want_a - plain).abs().max() > 1e-2
    got: dict[str, list] = {"a": [], "b": [], "plain": []}

    def steered(name, cfg, emph, want):
        def job(i):
            with steer(model, cfg, emph):
                out = _logits(model, r.input_ids)
                if i % 2:  # also a nested block inside the thread: innermost wins, then unwinds
                    with steer(model, cfg.replace(alpha=0.5), emph):
                        _logits(model, r.input_ids)
                    out = _logits(model, r.input_ids)
            got[name].append(torch.equal(out, want))
        return job

    def unsteered(i):
        got["plain"].append(torch.equal(_logits(model, r.input_ids), plain))

    _run_threads([steered("a", cfg_a, emph_a, want_a), steered("b", cfg_b, emph_b, want_b), unsteered])
    assert got == {"a": [True] * ITERATIONS, "b": [True] * ITERATIONS, "plain": [True] * ITERATIONS}
    assert model.config._attn_implementation == impl and backend.active_plans() == 0


def test_plans_are_invisible_to_other_threads():
    model, tok = tiny_model64(), tiny_tokenizer()
    r = rendered(tok, 0)
    seen = []
    inside, leave = threading.Event(), threading.Event()

    def other():
        inside.wait(timeout=60)
        seen.append((backend.active_plans(), backend.plan_for_config(model.config)))
        leave.set()

    t = threading.Thread(target=other)
    t.start()
    with steer(model, SteeringConfig(alpha=0.3), r) as plan:
        assert backend.plan_for_config(model.config) is plan and backend.active_plans() > 0
        inside.set()
        leave.wait(timeout=60)
    t.join()
    assert seen == [(0, None)]
    assert backend.plan_for_config(model.config) is None
