"""GreedyEngine (shared-prefix prefill + batched decoding) against one ``model.generate`` per prompt.

The reference is the plainest correct thing: each prompt alone, from scratch, through transformers'
``generate`` (greedy), inside ``steer()`` for steered prompts. The tiny models run in float64 so
that the engine's different but equivalent arithmetic (chunked prefill over a cached prefix,
left-padded batched decoding) cannot flip a near-tie: answers must be identical token for token.
"""

from __future__ import annotations

import pytest
import torch
from test_niah_unit import tiny_tokenizer

from ctxaware.niah import NEEDLES
from ctxaware.niah.engine import GreedyEngine, Job
from ctxaware.steering.model import greedy_generation_config
from ctxaware.niah.haystack import Haystack, read_haystack
from ctxaware.niah.prompts import build_prompt
from ctxaware.steering import SteeringConfig, steer


def _model(vocab: int, *, sliding_window: int | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048, bos_token_id=None,
                  eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    if sliding_window:
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.to(torch.float64).eval()


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    hay = Haystack(read_haystack("builtin"), tok)
    return tok, hay


def _jobs(tok, hay, modes=("chat", "chat+steer"), lengths=(200, 320, 400), depths=(0, 40, 100)):
    jobs = []
    for mode in modes:
        for length in lengths:
            for depth in depths:
                place = hay.place(NEEDLES["SF"].needle, length, depth, reserve=100)
                p = build_prompt(tok, place.text, NEEDLES["SF"], mode)
                jobs.append(Job(p.rendered, steer=p.steer, tag=(mode, length, depth)))
    return jobs


def _reference(model, tok, jobs, steer_cfg, max_new_tokens):
    gen_cfg = greedy_generation_config(model, tok, max_new_tokens)
    out = {}
    for job in jobs:
        ids = torch.tensor([job.rendered.input_ids])
        ctx = steer(model, steer_cfg, job.rendered) if job.steer else torch.no_grad()
        with ctx, torch.inference_mode():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
        out[job.tag] = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return out


def _engine_answers(engine, jobs):
    got = {}
    engine.run(jobs, lambda job, answer: got.__setitem__(job.tag, answer))
    return got


STEER = SteeringConfig(alpha=0.3)


@pytest.mark.parametrize("batch_size,reuse,batch_tokens", [(1, True, 9999), (4, True, 9999), (3, False, 9999),
                                                             (8, True, 900)])
def test_engine_matches_generate_per_prompt(setup, batch_size, reuse, batch_tokens):
    """``batch_tokens``: the decoding-batch memory budget, in prompt tokens of this model's KV cache."""
    tok, hay = setup
    model = _model(len(tok))
    jobs = _jobs(tok, hay)
    ref = _reference(model, tok, jobs, STEER, 8)
    per_token = 2 * 2 * 2 * 16 * 8  # layers x (k, v) x kv heads x head dim x float64 bytes
    engine = GreedyEngine(model, tok, 8, steer_config=STEER, reuse=reuse, batch_size=batch_size,
                          batch_memory=batch_tokens * per_token / 2**30, chunk=64)
    rows = []
    decode = engine._decode_batch
    engine._decode_batch = lambda batch, cb: (rows.append((len(batch), max(len(j.rendered.input_ids) for j in batch))),
                                              decode(batch, cb))
    got = _engine_answers(engine, jobs)
    assert sum(n for n, _ in rows) == len(jobs) and max(n for n, _ in rows) <= batch_size
    assert all(n * width <= batch_tokens or n == 1 for n, width in rows)  # the padded batch fits its budget
    if batch_tokens < 1000:
        assert len(rows) > len(jobs) / batch_size
    assert got == ref
    assert len(set(ref.values())) > 3  # the prompts really lead to different answers
    # steering changed something, so a steered row decoded with the wrong emphasis would show
    assert any(ref[("chat", L, d)] != ref[("chat+steer", L, d)] for L in (200, 320, 400) for d in (0, 40, 100))
    total = sum(len(j.rendered.input_ids) for j in jobs)
    if reuse:
        assert engine.prefilled_tokens < 0.75 * total
    else:
        assert engine.prefilled_tokens == total


def test_rows_finishing_early_leave_the_batch_without_changing_others(setup):
    tok, hay = setup
    model = _model(len(tok), seed=3)
    jobs = _jobs(tok, hay, modes=("chat",))
    # make the first greedy token of one prompt the end-of-sequence token: that row stops at once
    ids = torch.tensor([jobs[4].rendered.input_ids])
    with torch.inference_mode():
        first = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first
    ref = _reference(model, tok, jobs, None, 10)
    got = _engine_answers(GreedyEngine(model, tok, 10, batch_size=9, chunk=50), jobs)
    assert got == ref
    lengths = {len(tok(a)["input_ids"]) for a in ref.values()}
    assert len(lengths) > 1  # some rows stopped early, others ran on


def test_sliding_window_model_falls_back_to_generate(setup):
    tok, hay = setup
    model = _model(len(tok), sliding_window=64)
    jobs = _jobs(tok, hay, modes=("chat",), lengths=(200,), depths=(0, 100))
    engine = GreedyEngine(model, tok, 5, batch_size=2)
    assert not engine.shareable
    assert _engine_answers(engine, jobs) == _reference(model, tok, jobs, None, 5)


def test_every_job_reported_once_with_time(setup):
    tok, hay = setup
    model = _model(len(tok))
    jobs = _jobs(tok, hay, lengths=(200, 320), depths=(0, 100))
    seen = []
    GreedyEngine(model, tok, 3, steer_config=STEER, batch_size=3).run(jobs, lambda j, a: seen.append(j))
    assert sorted(j.tag for j in seen) == sorted(j.tag for j in jobs)
    assert all(j.seconds > 0 and j.kv == [] for j in seen)


def test_bad_arguments_raise(setup):
    tok, _ = setup
    model = _model(len(tok))
    for kw in ({"batch_size": 0}, {"chunk": 0}, {"batch_memory": 0}):
        with pytest.raises(ValueError):
            GreedyEngine(model, tok, 4, **kw)
    with pytest.raises(ValueError):
        GreedyEngine(model, tok, 0)


@pytest.mark.parametrize("sliding_window", [None, 64])
def test_truncated_flag_matches_generate(setup, sliding_window):
    """A job is ``truncated`` exactly when generate's own answer used the whole budget without an end token."""
    tok, hay = setup
    model = _model(len(tok), seed=3, sliding_window=sliding_window)
    jobs = _jobs(tok, hay, modes=("chat",), lengths=(200, 320), depths=(0, 40, 100))
    ids = torch.tensor([jobs[4].rendered.input_ids])
    with torch.inference_mode():
        model.generation_config.eos_token_id = int(model(ids).logits[0, -1].argmax())  # job 4 ends at once
    gen_cfg = greedy_generation_config(model, tok, 10)
    eos = gen_cfg.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    expected = {}
    for job in jobs:
        x = torch.tensor([job.rendered.input_ids])
        with torch.inference_mode():
            new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)[0, x.shape[1]:]
        new = new.tolist()
        expected[job.tag] = (len(new) == 10 and new[-1] not in eos, len(new))
    seen = {}
    GreedyEngine(model, tok, 10, batch_size=6, chunk=50).run(jobs, lambda j, a: seen.__setitem__(j.tag, (j.truncated, j.new_tokens)))
    assert seen == expected
    assert {t for t, _ in expected.values()} == {True, False}  # both kinds occur
