"""The vLLM plugin's parts that need no vLLM: request extension, extra_args, cache salt, steered math.

Runs in the main environment (fast). The steered-row math is compared with a float64 brute-force
reference (dense scores, explicit GQA repeat, explicit causal/window masks) independent of it.
"""

from __future__ import annotations

import math

import pytest
import torch

from ctxaware.chat import render
from ctxaware.errors import ConfigError, SteeringError
from ctxaware.steering.config import SteeringConfig
from ctxaware.vllm import request as RQ
from ctxaware.vllm.plugin import version_supported
from ctxaware.vllm.steered import steered_attention

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Read: cats sleep a lot. What do cats do?"},
        {"role": "assistant", "content": "They sleep."}, {"role": "user", "content": "And dogs?"}]


@pytest.fixture(scope="module")
def tokenizer():
    from ctxaware.models import load_tokenizer

    try:
        return load_tokenizer()
    except Exception as exc:  # the embedded model's package is missing
        pytest.skip(f"embedded tokenizer unavailable: {exc}")


def test_mask_spans():
    assert RQ.mask_spans([False, True, True, False, True]) == [1, 3, 4, 5]
    assert RQ.mask_spans([]) == [] and RQ.mask_spans([True]) == [0, 1]


def test_steering_request_round_trip(tokenizer):
    r = render(tokenizer, CHAT, add_generation_prompt=True)
    sr = RQ.steering_request(SteeringConfig(alpha=0.7, heads="0-3"), r)
    assert sr.steered and set(sr.extra_args) == set(RQ.EXTRA_KEYS)
    assert all(isinstance(v, (str, int, float, list)) for v in sr.extra_args.values())  # flat: vllm_xargs
    w = RQ.read_extra_args(sr.extra_args)
    assert w.alpha == 0.7 and w.heads == "0-3" and w.prompt_len == len(r.input_ids)
    users = [s for s in r.spans if s.role == "user"]
    assert list(w.spans) == [x for s in users for x in (s.start, s.end)]
    assert w.prompt_sha == RQ.prompt_digest(r.input_ids)
    assert sr.cache_salt == RQ.SALT_PREFIX + w.key
    last = RQ.steering_request(SteeringConfig(alpha=0.7, emphasis="last_user"), r)
    assert RQ.read_extra_args(last.extra_args).spans == (users[-1].start, users[-1].end)


def test_salt_keys_the_steering(tokenizer):
    r = render(tokenizer, CHAT, add_generation_prompt=True)
    a = RQ.steering_request(SteeringConfig(alpha=0.7), r)
    assert RQ.steering_request(SteeringConfig(alpha=0.7), r).cache_salt == a.cache_salt
    assert RQ.steering_request(SteeringConfig(alpha=0.6), r).cache_salt != a.cache_salt
    assert RQ.steering_request(SteeringConfig(alpha=0.7, heads="0"), r).cache_salt != a.cache_salt
    other = render(tokenizer, CHAT[:2], add_generation_prompt=True)
    assert RQ.steering_request(SteeringConfig(alpha=0.7), other).cache_salt != a.cache_salt
    plain = RQ.steering_request(None, r)
    assert not plain.steered and plain.extra_args == {} and plain.cache_salt is None
    one = RQ.steering_request(SteeringConfig(alpha=1.0), r)  # alpha 1 = unsteered, request untouched
    assert not one.steered and one.cache_salt is None
    assert RQ.steering_request(None, r, user_salt="u").cache_salt == "u"
    salted = RQ.steering_request(SteeringConfig(alpha=0.7), r, user_salt="u").cache_salt
    assert salted.endswith("|u") and salted != a.cache_salt


def test_refusals(tokenizer):
    r = render(tokenizer, CHAT, add_generation_prompt=True)
    with pytest.raises(RQ.UnsteerableError, match="rule 'share'"):
        RQ.steering_request(SteeringConfig(rule="share"), r)
    sys_only = render(tokenizer, [{"role": "system", "content": "hi"}], add_generation_prompt=True)
    with pytest.raises(SteeringError, match="emphasise no token"):
        RQ.steering_request(SteeringConfig(alpha=0.5), sys_only)
    good = RQ.steering_request(SteeringConfig(alpha=0.7), r).extra_args
    assert RQ.read_extra_args({}) is None and RQ.read_extra_args(None) is None
    for bad, match in [({k: v for k, v in good.items() if k != RQ.SPANS}, "lacks ctxaware_spans"),
                       ({RQ.SPANS: [1, 2]}, "no ctxaware_alpha"),
                       ({**good, RQ.SPANS: [3, 1]}, "start < end"),
                       ({**good, RQ.SPANS: [0, 10 ** 6]}, "must lie in"),
                       ({**good, RQ.PROMPT_LEN: 0}, "positive integer"),
                       ({**good, RQ.ALPHA: 1.5}, "alpha"),
                       ({**good, RQ.HEADS: "{bad json"}, "JSON")]:
        with pytest.raises(ConfigError, match=match):
            RQ.read_extra_args(bad)


def test_version_range():
    assert version_supported("0.32.0") and version_supported("0.32.1rc1+cpu")
    assert not version_supported("0.31.2") and not version_supported("0.33.0") and not version_supported("1.0")


def _reference(q, k, v, pos, kv_len, coef, down, scale, softcap, window):
    """float64, dense, one request and one query row at a time."""
    r, nq, hq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(r, nq, hq, v.shape[-1], dtype=torch.float64)
    for i in range(r):
        kk = k[i].double().repeat_interleave(g, 0)[:, :kv_len[i]]
        vv = v[i].double().repeat_interleave(g, 0)[:, :kv_len[i]]
        for t in range(nq):
            p = int(pos[i, t])
            s = torch.einsum("hd,hkd->hk", q[i, t].double(), kk) * scale
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            s = s + coef[i].double()[:, None] * down[i, :kv_len[i]].double()[None]
            keys = torch.arange(int(kv_len[i]))
            ok = keys <= p
            if window > 0:
                ok &= p - keys < window
            s = s.masked_fill(~ok[None], -math.inf)
            out[i, t] = torch.einsum("hk,hkd->hd", torch.softmax(s, -1), vv)
    return out


@pytest.mark.parametrize("softcap,window", [(0.0, -1), (5.0, -1), (0.0, 6)])
def test_steered_attention_matches_float64(softcap, window):
    torch.manual_seed(0)
    r, nq, hq, hkv, d, s = 3, 4, 6, 2, 8, 13
    q = torch.randn(r, nq, hq, d)
    k = torch.randn(r, hkv, s, d)
    v = torch.randn(r, hkv, s, d)
    kv_len = torch.tensor([13, 9, 5])
    pos = kv_len[:, None] - nq + torch.arange(nq)[None]  # the last nq positions of each request
    pos[2, :2] = 0  # request 2 has only 2 real query rows...
    coef = torch.zeros(r, hq)
    coef[0] = math.log(0.3)
    coef[1, :3] = math.log(0.6)  # ...and request 1 steers half its heads
    down = torch.rand(r, s) < 0.5
    got = steered_attention(q, k, v, q_pos=pos, kv_len=kv_len, coef=coef, down=down, scale=0.35,
                            softcap=softcap, window=window)
    want = _reference(q, k, v, pos, kv_len, coef, down, 0.35, softcap, window)
    assert (got.double() - want).abs().max() < 1e-5
    plain = steered_attention(q, k, v, q_pos=pos, kv_len=kv_len, coef=torch.zeros(r, hq), down=down, scale=0.35,
                              softcap=softcap, window=window)
    assert (plain.double() - want).abs().max() > 1e-2  # the bias matters in this test


def test_unsteerable_models_named():
    from types import SimpleNamespace as N

    from ctxaware.vllm.plugin import unsteerable_model_reason

    def cfg(model_type, **kw):
        return N(hf_text_config=N(model_type=model_type, **kw), use_mla=kw.pop("mla", False), is_hybrid=False)

    assert unsteerable_model_reason(cfg("llama")) is None and unsteerable_model_reason(cfg("gemma2")) is None
    assert "ALiBi" in unsteerable_model_reason(cfg("bloom"))
    assert "sinks" in unsteerable_model_reason(cfg("gpt_oss"))
    assert "MLA" in unsteerable_model_reason(N(hf_text_config=N(model_type="deepseek_v3"), use_mla=True))
