"""Context-dependency scores equal an independent brute-force computation from eager attentions."""

from __future__ import annotations

import math

import pytest
from test_measure_models import (brute_force_attentions, one_thread, real_conversations,  # noqa: F401
                                 tiny_model, tiny_tokenizer)

from ctxaware.chat import render
from ctxaware.scoring import RowError, Scorer, ScoringConfig, convert_sharegpt, default_layer, score_conversation

CONVS = [
    [{"role": "system", "content": "Read the passage below and answer the question."},
     {"role": "user", "content": "The passage: cats sleep a lot.\n\nWhat do cats do?"},
     {"role": "assistant", "content": "Cats sleep a lot."},
     {"role": "user", "content": "Summarise the text in one sentence."},
     {"role": "assistant", "content": "It was a bright cold day in April.\nThe end."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help you today?"}],
    [{"role": "user", "content": "What is the capital of France?\n"}, {"role": "assistant", "content": "Paris."}],
]


def brute_force_scores(model, tok, messages, layer, reduction="max", max_length=10_000):
    """Independent reference (METHOD §3): full eager attention matrices of the lone conversation.

    Keys: tokens rendered as system/user content, minus special tokens and bare-newline tokens.
    Queries of a turn: from its first content token through its closing end-of-turn token.
    """
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": ""}] + list(messages)
    r = render(tok, messages)
    ids = r.input_ids[:max_length]
    att = brute_force_attentions(model, ids)[layer]  # (H, T, T)
    special = set(tok.all_special_ids)

    def bare_newline(t):
        text = tok.decode([t])
        return "\n" in text and set(text) <= {"\n", " ", "\r", "\t"}

    keys = [p for p in range(len(ids)) if r.roles[p] in ("system", "user")
            and ids[p] not in special and not bare_newline(ids[p])]
    out = []
    for span in r.spans_of("assistant"):
        if span.end == span.start:
            out.append(None)
            continue
        close = next(p for p in range(span.end, len(r.input_ids)) if r.input_ids[p] == tok.eos_token_id)
        if close >= max_length:
            out.append(None)
            continue
        queries = list(range(span.start, close + 1))
        per_head = att[:, queries][:, :, keys].sum(-1)  # (H, Q)
        red = per_head.max(0).values if reduction == "max" else per_head.mean(0)
        out.append(float(red.mean()))
    return out


@pytest.fixture(scope="module", params=[("llama", "chatml"), ("qwen2", "zephyr"), ("llama", "llama2")],
                ids=lambda p: "-".join(p))
def setup(request):
    """Each (model, template) pair: for the comparisons with brute force."""
    kind, template = request.param
    return tiny_model(kind), tiny_tokenizer(template)


@pytest.fixture(scope="module")
def one():
    """One pair, for the tests of options and bad input."""
    return tiny_model("qwen2"), tiny_tokenizer("llama2")


def _close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None), (a, b)
        if x is not None:
            assert abs(x - y) <= tol, (a, b)


def test_scores_match_brute_force_batched(setup):
    model, tok = setup
    scorer = Scorer(model, tok, ScoringConfig(batch_size=3))
    rows = scorer.score_many(CONVS)
    for conv, row in zip(CONVS, rows):
        assert row.error is None
        _close(row.scores, brute_force_scores(model, tok, conv, scorer.layer))
        assert all(0.0 < s < 1.0 for s in row.scores)
        assert row.reasons == [None] * len(row.scores)
    # batching (and its padding) does not change a score
    alone = [scorer.score(c) for c in CONVS]
    for a, b in zip(alone, rows):
        _close(a.scores, b.scores, tol=1e-6)


@pytest.mark.parametrize("layer,reduction", [(0, "mean"), (3, "max")])
def test_layer_and_head_reduction_options(one, layer, reduction):
    model, tok = one
    got = score_conversation(model, tok, CONVS[0], layer=layer, head_reduction=reduction)
    _close(got, brute_force_scores(model, tok, CONVS[0], layer, reduction))


def test_default_layer_is_paper_fraction():
    assert default_layer(22) == 15
    assert default_layer(30) == 20
    assert default_layer(4) == 2
    from ctxaware.errors import ConfigError

    with pytest.raises(ConfigError):
        Scorer(tiny_model("llama"), tiny_tokenizer("chatml"), ScoringConfig(layer=4))


def test_newline_tokens_are_excluded_from_keys(one):
    model, tok = one
    with_nl = score_conversation(model, tok, CONVS[0])
    without = score_conversation(model, tok, CONVS[0], exclude_newlines=False)
    assert with_nl != without
    assert all(a <= b + 1e-7 for a, b in zip(with_nl, without))  # fewer keys, less mass


def test_truncation_gives_no_score_to_later_turns(setup):
    model, tok = setup
    full = render(tok, [{"role": "system", "content": ""}] + CONVS[1] + CONVS[2])
    cut = full.spans_of("assistant")[1].start + 1  # second turn does not fit
    conv = CONVS[1] + CONVS[2]
    row = Scorer(model, tok, ScoringConfig(max_length=cut)).score(conv)
    assert row.scores[1] is None and row.reasons[1] == "truncated"
    _close(row.scores, brute_force_scores(model, tok, conv, default_layer(4), max_length=cut))


def test_undefined_turns_and_bad_rows(one):
    model, tok = one
    scorer = Scorer(model, tok)
    row = scorer.score([{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": ""},
                        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Paris."}])
    assert row.scores[0] is None and row.reasons[0] == "empty_response"
    assert row.scores[1] is not None and not math.isnan(row.scores[1])
    row = scorer.score([{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Paris."}])
    assert row.reasons == ["no_user", None]
    bad = scorer.score_many([
        [{"role": "user", "content": "Hello!"}],
        [{"role": "user", "content": "Hello!"}, {"role": "narrator", "content": "x"}],
        [{"role": "user", "content": {"text": "Hello!"}}, {"role": "assistant", "content": "x"}],
        {"text": "no conversation"},
        CONVS[1],
    ])
    assert [b.error for b in bad] == ["no_assistant_turn", "unknown_role:narrator", "non_string_content",
                                      "no_messages", None]
    assert all(b.scores is None for b in bad[:4]) and bad[-1].scores[0] is not None
    with pytest.raises(RowError):
        score_conversation(model, tok, [{"role": "user", "content": "x"}])


def test_sharegpt_conversion_and_scoring(one):
    model, tok = one
    conv = [{"from": "system", "value": CONVS[0][0]["content"]}, {"from": "human", "value": CONVS[0][1]["content"]},
            {"from": "gpt", "value": CONVS[0][2]["content"]}]
    assert convert_sharegpt(conv) == CONVS[0][:3]
    row = Scorer(model, tok).score({"conversations": conv})
    _close(row.scores, brute_force_scores(model, tok, CONVS[0][:3], default_layer(4)))
    with pytest.raises(RowError) as exc:
        convert_sharegpt([{"from": "narrator", "value": "x"}])
    assert exc.value.reason == "unknown_role:narrator"


def test_real_conversations_match_brute_force():
    """Held-out real conversations (shared instruction data; skipped without it), with truncation."""
    convs = real_conversations(8, seed=5)
    model, tok = tiny_model("qwen2", positions=512), tiny_tokenizer("chatml")
    scorer = Scorer(model, tok, ScoringConfig(max_length=384, batch_size=4))
    rows = scorer.score_many(convs)
    n_scored = 0
    for conv, row in zip(convs, rows):
        assert row.error is None
        ref = brute_force_scores(model, tok, conv, scorer.layer, max_length=384)
        _close(row.scores, ref)
        n_scored += sum(s is not None for s in row.scores)
        assert all(reason in (None, "truncated") for reason in row.reasons)
    assert n_scored >= 4


def test_config_validation():
    from ctxaware.errors import ConfigError

    with pytest.raises(ConfigError):
        ScoringConfig(head_reduction="min")
    with pytest.raises(ConfigError):
        ScoringConfig(batch_size=0)
    with pytest.raises(ConfigError):
        ScoringConfig(max_length=1)
    assert ScoringConfig.from_dict(ScoringConfig(layer=3).to_dict()).layer == 3
