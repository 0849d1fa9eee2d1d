"""measure_attention equals brute-force eager attention sums (tiny Llama/Qwen2 models with GQA,
three chat templates, multi-turn, right- and left-padded batches), without T×T tensors."""

from __future__ import annotations

import json

import pytest
import torch
from test_measure_models import brute_force_attentions, one_thread, tiny_model, tiny_tokenizer  # noqa: F401

from ctxaware.chat import render
from ctxaware.chat.types import ROLES
from ctxaware.errors import ConfigError, InputError
from ctxaware.measure import measure_attention, render_plain
from ctxaware.measure import mechanism

CHATS = [
    [{"role": "system", "content": "Read the passage below and answer the question."},
     {"role": "user", "content": "The passage: cats sleep a lot.\nWhat do cats do?"},
     {"role": "assistant", "content": "Cats sleep a lot."},
     {"role": "user", "content": "Summarise the text in one sentence."}],
    [{"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And the quick brown fox?"},
     {"role": "assistant", "content": "It jumps over the lazy dog.\n\nThe end."}],
]
SETUPS = [("llama", "chatml"), ("qwen2", "zephyr"), ("llama", "llama2")]


def _onehot(rendered):
    u = torch.zeros(len(rendered.input_ids), len(ROLES))
    for i, r in enumerate(rendered.roles):
        u[i, ROLES.index(r)] = 1.0
    return u


def _reference(model, rendered, positions, layers, *, per_query=False):
    """Brute force: full eager attention matrices of the lone conversation, summed per role."""
    att = brute_force_attentions(model, rendered.input_ids)
    u = _onehot(rendered)
    per_q = torch.stack([att[x][:, positions, :].matmul(u) for x in layers])  # (L, H, Q, C)
    return per_q if per_query else per_q.mean(dim=2)


@pytest.fixture(scope="module", params=SETUPS, ids=lambda p: "-".join(p))
def setup(request):
    """Each (model, template) pair: for the tests that compare with brute force."""
    kind, template = request.param
    return tiny_model(kind), tiny_tokenizer(template)


@pytest.fixture(scope="module")
def one():
    """One pair, for the tests of options, errors and state."""
    return tiny_model("qwen2"), tiny_tokenizer("chatml")


def test_last_query_matches_eager(setup):
    model, tok = setup
    for messages in CHATS:
        rendered = render(tok, messages, add_generation_prompt=messages[-1]["role"] == "user")
        res = measure_attention(model, rendered, queries="last")
        ref = _reference(model, rendered, [len(rendered.input_ids) - 1], range(4))
        assert res.mass.shape == (4, 4, 4) and res.channels == list(ROLES)
        assert (res.mass - ref).abs().max().item() <= 1e-5
        torch.testing.assert_close(res.mass.sum(-1), torch.ones(4, 4), atol=1e-5, rtol=0)
        assert res.mass[..., ROLES.index("user")].max() > 0.01  # not a trivially zero channel


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_batch_matches_each_conversation_alone(setup, padding):
    model, tok = setup
    rendered = [render(tok, m) for m in CHATS[1:]] + [render(tok, CHATS[0], add_generation_prompt=True)]
    assert len({len(r.input_ids) for r in rendered}) == len(rendered)  # padding really happens
    results = measure_attention(model, rendered, queries="assistant", tokenizer=tok, layers=[0, 2], heads=[1, 3],
                                padding=padding, per_query=True, batch_size=3)
    assert len(results) == len(rendered)
    for r, res in zip(rendered, results):
        ref = _reference(model, r, res.queries, [0, 2], per_query=True)[:, [1, 3]]
        assert res.query_mass.shape == (2, 2, len(res.queries), 4)
        assert (res.query_mass - ref).abs().max().item() <= 1e-5
        assert (res.mass - ref.mean(dim=2)).abs().max().item() <= 1e-5


def test_assistant_queries_cover_content_and_closing_token(setup):
    model, tok = setup
    r = render(tok, CHATS[2])
    res = measure_attention(model, r, queries="assistant", tokenizer=tok, layers=[1])
    spans = r.spans_of("assistant")
    content = {p for s in spans for p in range(s.start, s.end)}
    assert content <= set(res.queries)
    closing = [p for p in res.queries if r.input_ids[p] == tok.eos_token_id]
    assert len(closing) == len(spans)  # one closing token per turn
    for s, close in zip(spans, closing):
        assert close >= s.end and all(r.roles[p] == "template" for p in range(s.end, close + 1))
        assert set(range(s.start, close + 1)) <= set(res.queries)


def test_explicit_positions_and_negative_index(one):
    model, tok = one
    r = render(tok, CHATS[0])
    res = measure_attention(model, r, queries=[3, -1, 10])
    n = len(r.input_ids)
    assert res.queries == [3, n - 1, 10]
    ref = _reference(model, r, [3, n - 1, 10], range(4))
    assert (res.mass - ref).abs().max().item() <= 1e-5
    with pytest.raises(ConfigError):
        measure_attention(model, r, queries=[n])
    with pytest.raises(ConfigError):
        measure_attention(model, r, queries="first")


def test_keys_by_span_sum_to_role_mass(one):
    model, tok = one
    r = render(tok, CHATS[2])
    by_role = measure_attention(model, r, queries="last")
    by_span = measure_attention(model, r, queries="last", keys_by_role=False)
    assert by_span.channels == ["user[0]", "assistant[0]", "user[1]", "assistant[1]", "template"]
    user_cols = [i for i, c in enumerate(by_span.channels) if c.startswith("user[")]
    torch.testing.assert_close(by_span.mass[..., user_cols].sum(-1), by_role.role("user"), atol=1e-6, rtol=0)


def test_chunked_queries_hold_no_t_by_t_tensor(monkeypatch):
    """With a small chunk budget the scores are computed a few rows at a time: no op of the whole
    measurement (model layers included) produces a tensor of T×T elements, and the result is exact."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, tok = tiny_model("llama"), tiny_tokenizer("chatml")
    text = " ".join(m["content"] for c in CHATS for m in c) * 3
    r = render(tok, [{"role": "user", "content": text}, {"role": "assistant", "content": text[:400]}])
    n = len(r.input_ids)
    assert n > 300
    monkeypatch.setattr(mechanism, "_MAX_SCORE_ELEMENTS", 4 * 4 * n)  # 4 query rows per chunk

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    model.config._attn_implementation = "sdpa"  # unmeasured layers delegate to it: fused, no T×T scores
    with Largest():
        res = measure_attention(model, r, queries="assistant", tokenizer=tok, layers=[2])
    model.config._attn_implementation = "eager"
    assert Largest.largest < n * n / 2
    ref = _reference(model, r, res.queries, [2])
    assert (res.mass - ref).abs().max().item() <= 1e-5


def test_early_exit_skips_later_layers_and_restores_model(one):
    model, tok = one
    r = render(tok, CHATS[0])
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
             for k, layer in enumerate(model.model.layers)]
    try:
        measure_attention(model, r, layers=[1])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]  # layer 1 stopped inside its attention; layers 2, 3 never ran
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([r.input_ids]), output_attentions=True)
    assert len(out.attentions) == 4


def test_model_restored_after_an_exception(monkeypatch):
    model, tok = tiny_model("qwen2"), tiny_tokenizer("zephyr")
    r = render(tok, CHATS[1])
    before = model(input_ids=torch.tensor([r.input_ids])).logits

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(mechanism, "_mass", boom)
    with pytest.raises(RuntimeError, match="boom"):
        measure_attention(model, r, layers=[2])
    assert model.config._attn_implementation == "eager"
    assert mechanism._ACTIVE.get() is None
    torch.testing.assert_close(model(input_ids=torch.tensor([r.input_ids])).logits, before, atol=0, rtol=0)


def test_shares_sum_to_one_and_errors(one):
    model, tok = one
    res = measure_attention(model, render(tok, CHATS[1]), queries="last")
    shares = res.shares()
    assert set(shares) == set(ROLES)
    for layer in range(4):
        assert abs(sum(shares[r][layer] for r in ROLES) - 1) < 1e-9
    assert json.loads(json.dumps(res.to_dict()))["shares"] == shares
    with pytest.raises(InputError):
        measure_attention(model, render(tok, CHATS[1][:1]), queries="assistant")
    with pytest.raises(ConfigError):
        measure_attention(model, render(tok, CHATS[1]), layers=[7])
    with pytest.raises(ConfigError):
        measure_attention(model, render(tok, CHATS[1]), heads=[4])
    with pytest.raises(ConfigError):
        measure_attention(model, render(tok, CHATS[1]), padding="middle")
    with pytest.raises(ConfigError):
        res.role("tool")
    assert measure_attention(model, [], queries="last") == []


def test_render_plain_roles_and_measurement(one):
    model, tok = one
    r = render_plain(tok, CHATS[0])
    assert r.text == "\n".join(m["content"] for m in CHATS[0])
    for span in r.spans:
        assert tok.decode(r.input_ids[span.start:span.end]).strip() == CHATS[0][span.message]["content"].strip()
    assert "assistant" in r.roles and "system" in r.roles
    res = measure_attention(model, r, queries="last")
    ref = _reference(model, r, [len(r.input_ids) - 1], range(4))
    assert (res.mass - ref).abs().max().item() <= 1e-5
    with pytest.raises(InputError):
        render_plain(tok, [{"role": "user", "content": 3}])


def _fake_loader(model, tok):
    return lambda *a, **k: type("Loaded", (), {"model": model, "tokenizer": tok, "name": "tiny",
                                               "__iter__": lambda self: iter((model, tok))})()


def test_cli_attention_compare_template_json_and_plot(tmp_path, monkeypatch, capsys):
    from ctxaware.cli.main import main

    model, tok = tiny_model("llama"), tiny_tokenizer("chatml")
    monkeypatch.setattr("ctxaware.models.load_model", _fake_loader(model, tok))
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"messages": CHATS[0]}))
    plot = tmp_path / "shares.png"
    assert main(["attention", "--messages", str(chat), "--compare-template", "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == [0, 1, 2, 3] and set(out["conditions"]) == {"template", "no_template"}
    for name, cond in out["conditions"].items():
        for layer in range(4):
            assert abs(sum(cond["shares"][r][layer] for r in ROLES) - 1) < 1e-6
    # the template condition is measured at the last token of the generation prompt, as measure_attention does
    rendered = render(tok, CHATS[0], add_generation_prompt=True)
    direct = measure_attention(model, rendered).shares()
    for role in ROLES:
        assert out["conditions"]["template"]["shares"][role] == pytest.approx(direct[role], abs=1e-9)
    assert out["conditions"]["template"]["tokens"] == len(rendered.input_ids)
    assert out["conditions"]["no_template"]["shares"]["template"] != out["conditions"]["template"]["shares"]["template"]
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"

    assert main(["attention", "--messages", str(chat), "--layers", "1-2", "--queries", "last"]) == 0
    text = capsys.readouterr().out
    assert "template (" in text and text.count("\n") == 4  # header, column names, two layers
    assert main(["attention", "--messages", str(chat), "--queries", "assistant", "--layers", "x"]) == 2
    assert "--layers" in capsys.readouterr().err


def test_measured_layer_never_reached_names_the_model_class(one):
    """A requested layer whose attention never passed through the measurement is an error after the
    first forward pass, naming the model class (never an empty or partial result)."""
    from ctxaware.errors import SteeringError

    model, tok = one
    r = render(tok, CHATS[0])
    attn = model.model.layers[1].self_attn
    saved = attn.layer_idx
    attn.layer_idx = 99  # layer 1 now reports itself as a layer nobody asked for
    try:
        with pytest.raises(SteeringError, match=r"Qwen2ForCausalLM: attention layers \[1\] never went through"):
            measure_attention(model, r, layers=[1])
    finally:
        attn.layer_idx = saved
    assert measure_attention(model, r, layers=[1]).mass.shape[0] == 1
