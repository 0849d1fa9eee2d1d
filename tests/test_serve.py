"""``ctxaware serve`` through the real ``openai`` client against a server on 127.0.0.1.

A tiny random Llama in float64 (so that batched, left-padded decoding cannot flip a near-tie) is
served in-process by uvicorn on a free port. References are computed the plainest way: one
``SteeredModel.chat`` per prompt (``model.generate`` under ``steer()``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest
import torch
from test_niah_unit import tiny_tokenizer

from ctxaware.serve import BackgroundServer, ServeConfig, build_app
from ctxaware.steering import SteeredModel, SteeringConfig

openai = pytest.importorskip("openai")

WINDOW = 512
DOC = ("The lighthouse on Karren Point was painted green in 1911 and its keeper was Ada Voss. "
       "Ships passing at night saw its light every nine seconds. ")
PROMPTS = [
    [{"role": "user", "content": DOC + "Who kept the lighthouse?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What colour was it?"}],
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."},
     {"role": "user", "content": DOC + "How often did the light flash?"}],
    [{"role": "user", "content": "When was it painted? " + DOC}],
]


def _model(vocab: int, eos: int, pad: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=WINDOW, bos_token_id=None,
                      eos_token_id=eos, pad_token_id=pad, initializer_range=0.2)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


@pytest.fixture(scope="module")
def served():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = _model(len(tok), tok.eos_token_id, tok.pad_token_id)
    default = SteeringConfig(alpha=0.5, heads="0", emphasis="user")
    app = build_app(model, tok, "tiny", ServeConfig(port=0, max_concurrency=4, max_queue=8, timeout=60),
                    steering=None)
    steered_app = build_app(model, tok, "tiny-steered", ServeConfig(port=0, max_concurrency=8, timeout=60),
                            steering=default)
    with BackgroundServer(app) as srv, BackgroundServer(steered_app) as srv2:
        yield model, tok, srv, srv2, default


def _client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)


def _ask(srv, messages, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return _client(srv).chat.completions.create(model="tiny", messages=messages, **kw)


def test_models_and_health(served):
    _, _, srv, _, _ = served
    models = _client(srv).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(srv.base_url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["max_concurrency"] == 4


def test_plain_reply_equals_unsteered_chat(served):
    model, tok, srv, _, _ = served
    ref = SteeredModel(model, tok).chat(PROMPTS[0], max_new_tokens=12)
    resp = _ask(srv, PROMPTS[0])
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip() == ref
    assert choice.finish_reason in ("length", "stop")
    prompt_ids = SteeredModel(model, tok).render(PROMPTS[0]).input_ids
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model_extra["ctxaware"]["steered"] is False


def test_content_parts_equal_string_content(served):
    _, _, srv, _, _ = served
    parts = [{"role": "user", "content": [{"type": "text", "text": DOC}, {"type": "text", "text": "Who?"}]}]
    text = [{"role": "user", "content": DOC + "Who?"}]
    assert _ask(srv, parts).choices[0].message.content == _ask(srv, text).choices[0].message.content


def test_streamed_reply_equals_plain_reply(served):
    _, _, srv, _, _ = served
    plain = _ask(srv, PROMPTS[2])
    chunks = list(_ask(srv, PROMPTS[2], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_steered_reply_equals_steered_model_chat(served):
    model, tok, srv, _, _ = served
    for ext, cfg in [({"alpha": 0.3}, SteeringConfig(alpha=0.3)),
                     ({"alpha": 0.2, "heads": "1:0,3", "emphasis": "last_user"},
                      SteeringConfig(alpha=0.2, heads="1:0,3", emphasis="last_user"))]:
        ref = SteeredModel(model, tok, cfg).chat(PROMPTS[2], max_new_tokens=12)
        resp = _ask(srv, PROMPTS[2], extra_body={"ctxaware": ext})
        assert resp.choices[0].message.content.strip() == ref
        applied = resp.model_extra["ctxaware"]
        assert applied["steered"] and applied["source"] == "request" and applied["steering"]["alpha"] == ext["alpha"]
    unsteered = SteeredModel(model, tok).chat(PROMPTS[2], max_new_tokens=12)
    assert ref != unsteered  # the steering this test checks does change the reply


def test_server_default_steering_and_indicator(served):
    model, tok, _, srv2, default = served
    ref = SteeredModel(model, tok, default).chat(PROMPTS[0], max_new_tokens=12)
    resp = _ask(srv2, PROMPTS[0])
    assert resp.choices[0].message.content.strip() == ref
    assert resp.model_extra["ctxaware"]["source"] == "server"
    off = _ask(srv2, PROMPTS[0], extra_body={"ctxaware": {"alpha": 1}})
    assert off.model_extra["ctxaware"]["steered"] is False
    assert off.choices[0].message.content.strip() == SteeredModel(model, tok).chat(PROMPTS[0], max_new_tokens=12)
    ind = _ask(srv2, PROMPTS[0], extra_body={"ctxaware": {"indicator": True}})
    msgs = [{"role": "user", "content": PROMPTS[0][0]["content"] + " [IND]"}]
    assert ind.choices[0].message.content.strip() == SteeredModel(model, tok, default).chat(msgs, max_new_tokens=12)
    assert ind.model_extra["ctxaware"]["indicator"] is True
    assert ind.usage.prompt_tokens > resp.usage.prompt_tokens


def test_concurrent_mixed_requests_each_get_their_single_reply(served):
    """Steered (several alphas/emphases) and unsteered requests in flight together, with different
    lengths, so rows join and leave the running batch: each reply equals its single-request reply."""
    model, tok, _, srv2, default = served
    cases = []
    for i, msgs in enumerate(PROMPTS):
        cases.append((msgs, {"alpha": 1}, None, 6 + 3 * i))
        cases.append((msgs, None, default, 14 - 2 * i))
        # request fields override the server default's (its heads stay)
        cases.append((msgs, {"alpha": 0.25, "emphasis": "system+user"}, default.replace(alpha=0.25,
                      emphasis="system+user"), 9 + i))
    refs = [SteeredModel(model, tok, cfg).chat(m, max_new_tokens=n) for m, _, cfg, n in cases]

    def call(case):
        msgs, ext, _, n = case
        return _ask(srv2, msgs, max_tokens=n, extra_body={"ctxaware": ext} if ext else None)

    with cf.ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(call, cases))
    assert [r.choices[0].message.content.strip() for r in replies] == refs
    assert all(r.usage.completion_tokens <= c[3] for r, c in zip(replies, cases))


def test_stop_strings_and_sampling(served):
    _, _, srv, _, _ = served
    full = _ask(srv, PROMPTS[1], max_tokens=20).choices[0].message.content
    assert len(full) > 4
    stop = full[2:4]
    cut = _ask(srv, PROMPTS[1], max_tokens=20, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[:full.find(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(srv, PROMPTS[1], max_tokens=20, stop=stop,
                                                                      stream=True) if c.choices)
    assert streamed == full[:full.find(stop)]
    a = _ask(srv, PROMPTS[1], temperature=1.5, seed=7, max_tokens=16).choices[0].message.content
    b = _ask(srv, PROMPTS[1], temperature=1.5, seed=7, max_tokens=16).choices[0].message.content
    c = [_ask(srv, PROMPTS[1], temperature=1.5, seed=s, max_tokens=16).choices[0].message.content for s in (1, 2, 3)]
    assert a == b and len(set(c + [a])) > 1


@pytest.mark.parametrize("kwargs,param", [
    (dict(extra_body={"ctxaware": {"alpha": 1.5}}), "ctxaware.alpha"),
    (dict(extra_body={"ctxaware": {"alpha": 0}}), "ctxaware.alpha"),
    (dict(extra_body={"ctxaware": {"alpah": 0.9}}), "ctxaware.alpah"),
    (dict(extra_body={"ctxaware": {"heads": "7"}}), "ctxaware.heads"),
    (dict(extra_body={"ctxaware": {"heads": "0:9"}}), "ctxaware.heads"),
    (dict(extra_body={"ctxaware": {"emphasis": "robot"}}), "ctxaware.emphasis"),
    (dict(extra_body={"ctxaware": {"emphasis": "assistant"}}), "ctxaware"),  # no assistant turn to emphasise
    (dict(extra_body={"ctxaware": {"indicator": "yes"}}), "ctxaware.indicator"),
    (dict(extra_body={"ctxaware": [0.9]}), "ctxaware"),
    (dict(extra_body={"seed": "x"}), "seed"),
    (dict(n=2), "n"),
    (dict(max_tokens=WINDOW), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=3), "temperature"),
    (dict(top_p=-1), "top_p"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]"),
    (dict(messages=[{"role": "user", "content": "word " * 600}]), "messages"),
    (dict(messages=[]), "messages"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
])
def test_bad_requests_get_openai_errors(served, kwargs, param):
    _, _, srv, _, _ = served
    messages = kwargs.pop("messages", PROMPTS[1])
    with pytest.raises(openai.BadRequestError) as info:
        _ask(srv, messages, **kwargs)
    err = info.value.body
    assert info.value.status_code == 400 and err["param"] == param
    assert err["type"] == "invalid_request_error" and err["message"]
    assert _ask(srv, PROMPTS[1], max_tokens=3).choices[0].message.content is not None  # still serving


def test_malformed_json_and_unknown_route(served):
    _, _, srv, _, _ = served
    r = httpx.post(srv.base_url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(srv.base_url + "/chat/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(srv.base_url + "/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_streaming_client_that_disconnects_frees_its_row(served):
    _, _, srv, _, _ = served
    body = {"model": "tiny", "messages": PROMPTS[0], "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.base_url + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert json.loads(first.removeprefix("data: "))["object"] == "chat.completion.chunk"
    health_url = srv.base_url.removesuffix("/v1") + "/health"
    import time

    for _ in range(200):
        if httpx.get(health_url).json()["running"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(health_url).json()["running"] == 0
    assert _ask(srv, PROMPTS[1], max_tokens=3).choices[0].message.content is not None


def test_engine_limits_timeout_queue_and_shutdown(served):
    """Engine-level limits without HTTP: a request past its deadline gets a 504, a full queue a 503,
    and stopping the engine answers everything still waiting with a 503."""
    import time

    from ctxaware.serve import APIError, Generation, ServeEngine

    model, tok, _, _, _ = served
    rendered = SteeredModel(model, tok).render(PROMPTS[1])
    events = []

    def gen(**kw):
        return Generation(list(rendered.input_ids), rendered, 8, lambda k, v: events.append((k, v)), temperature=0,
                          **kw)

    engine = ServeEngine(model, tok, max_concurrency=1, max_queue=1)
    engine.submit(gen(deadline=time.monotonic() - 1))
    with pytest.raises(APIError) as info:  # one free slot + one queue place are taken
        engine.submit(gen())
        engine.submit(gen())
    assert info.value.status == 503 and info.value.code == "queue_full"
    engine.start()
    for _ in range(400):
        if len(events) >= 2 and events[-1][0] != "text":
            break
        time.sleep(0.01)
    engine.stop()
    finals = [(k, v) for k, v in events if k != "text"]
    assert finals[0][0] == "error" and finals[0][1].status == 504
    assert finals[1] == ("done", "length")
    with pytest.raises(APIError) as info:
        engine.submit(gen())
    assert info.value.status == 503 and info.value.code == "shutdown"


def test_text_held_back_for_stop_strings_is_sent_when_the_reply_ends(served):
    """With a stop string that never occurs, the last characters are held back at each step; they
    must still be sent when the row ends at an end-of-sequence token."""
    import threading

    from ctxaware.serve import Generation, ServeEngine

    model, tok, _, _, _ = served
    rendered = SteeredModel(model, tok).render(PROMPTS[0])
    engine = ServeEngine(model, tok)
    tokens = []

    def run(stop):
        pieces, done = [], threading.Event()

        def sink(kind, value):
            pieces.append(value) if kind == "text" else done.set()

        g = Generation(list(rendered.input_ids), rendered, 10, sink, temperature=0, stop=stop)
        engine.submit(g)
        engine.start()
        assert done.wait(60)
        tokens[:] = g.tokens
        return "".join(pieces), g

    full, _ = run([])
    assert len(tokens) == 10
    engine.stop()
    k = next(i for i in range(3, 10) if tokens[i] not in tokens[:i])  # a token new to the reply
    engine = ServeEngine(model, tok)
    engine.eos = engine.eos | {tokens[k]}  # the same reply now ends at its (k+1)-th token
    cut, g = run(["\x00never\x00"])
    engine.stop()
    assert g.tokens == tokens[:k + 1]
    assert cut == tok.decode(tokens[:k], skip_special_tokens=True) and full.startswith(cut) and cut


def test_joining_prompts_are_prefilled_together_and_match_single_replies(served):
    """Requests queued before the scheduler starts join in one left-padded prefill pass (prompts of
    different lengths, steered and unsteered rows mixed); each reply equals its single-request reply,
    and a tiny ``prefill_tokens`` budget splits the same prompts into several passes with the same replies."""
    import time

    from ctxaware.serve import Generation, ServeEngine

    model, tok, _, _, _ = served
    configs = [None, SteeringConfig(alpha=0.3), SteeringConfig(alpha=0.6, heads="0", emphasis="last_user"), None]
    refs = [SteeredModel(model, tok, cfg).chat(m, max_new_tokens=10) for m, cfg in zip(PROMPTS, configs)]
    lengths = [len(SteeredModel(model, tok).render(m).input_ids) for m in PROMPTS]
    assert len(set(lengths)) > 1  # left padding is exercised

    for budget, passes in ((100_000, 1), (max(lengths), len(PROMPTS))):
        engine = ServeEngine(model, tok, max_concurrency=8, prefill_tokens=budget)
        done: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
        for i, (msgs, cfg) in enumerate(zip(PROMPTS, configs)):
            rendered = SteeredModel(model, tok).render(msgs)
            engine.submit(Generation(list(rendered.input_ids), rendered, 10,
                                     lambda k, v, i=i: done[i].append((k, v)), steering=cfg, temperature=0))
        engine.start()
        for _ in range(1000):
            if all(ev and ev[-1][0] != "text" for ev in done.values()):
                break
            time.sleep(0.01)
        engine.stop()
        assert engine.prefills == passes
        assert 1 <= engine.plans_opened < engine.steps  # one plan per batch composition, not per step
        texts = ["".join(v for k, v in done[i] if k == "text").strip() for i in range(len(PROMPTS))]
        assert texts == refs
