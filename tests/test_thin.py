"""Steered prefill as a correction of the plain kernel's output (``attention.thin``).

* equal to a float64 brute force (fp32 to 1e-6, fp64 to 1e-12): grouped-query heads, rows with
  different down-weighted keys, unsteered heads (α = 1) and the smallest α taken (0.5);
* taken only where it is safe: α ≥ 0.5, fp32/fp64 on CPU, causal prefill without a padding mask,
  the fixed-α rule, few down keys, the ``auto`` path;
* a tiny model steered through it gives the padded channels' logits, and it is what ran.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_measure_models import one_thread  # noqa: F401  (autouse: one torch thread)
from ctxaware.attention import flex as FX
from ctxaware.attention import functional as AF
from ctxaware.attention import thin as TH


def _inputs(dtype, t=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, h_kv, d = 2, 4, 2, 16
    q = torch.randn(b, t, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)  # transformers' strides
    k = torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64).to(dtype)
    down = torch.zeros(b, t, dtype=torch.bool)
    down[0, :4] = True  # a system prompt ...
    down[0, t - 3:] = True  # ... and the assistant header
    down[1, 2:7] = True
    coef = torch.log(torch.tensor([[0.5, 0.9, 1.0, 0.7], [0.95, 0.6, 0.5, 1.0]], dtype=torch.float64))
    return q, k, v, down, coef


def _brute(q, k, v, down, coef, scaling):
    n_rep = q.shape[1] // k.shape[1]
    qq, kk, vv = q.double(), k.double().repeat_interleave(n_rep, 1), v.double().repeat_interleave(n_rep, 1)
    s = qq @ kk.transpose(-1, -2) * scaling + coef.double()[:, :, None, None] * down.double()[:, None, None, :]
    t = q.shape[2]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_correction_equals_brute_force(dtype, tol):
    q, k, v, down, coef = _inputs(dtype)
    scaling = 16 ** -0.5
    assert TH.wanted(q, k, v, None, coef=coef, down=down, is_causal=True)
    out = TH.attention(q, k, v, scaling=scaling, coef=coef, down=down)
    assert out is not None and out.shape == (2, 320, 4, 16) and out.is_contiguous() and out.dtype == dtype
    exact = _brute(q, k, v, down, coef, scaling)
    assert (out.double() - exact).abs().max() <= tol
    with FX.use_path("sdpa"):  # the padded channels agree
        channels = AF.sdpa_key_bias(q, k, v, None, scaling=scaling, coef=coef, down=down)
    assert (out.double() - channels.double()).abs().max() <= 2 * tol
    # unsteered heads (alpha 1) keep the plain kernel's output exactly
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                             enable_gqa=True).transpose(1, 2)
    assert torch.equal(out[0, :, 2], plain[0, :, 2]) and torch.equal(out[1, :, 3], plain[1, :, 3])


def test_no_down_keys_is_the_plain_kernel():
    q, k, v, _, coef = _inputs(torch.float32)
    down = torch.zeros(2, 320, dtype=torch.bool)
    out = TH.attention(q, k, v, scaling=0.25, coef=coef, down=down)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert torch.equal(out, plain.transpose(1, 2).contiguous())


def test_taken_only_where_safe(monkeypatch):
    q, k, v, down, coef = _inputs(torch.float32)
    ok = dict(coef=coef, down=down, is_causal=True)
    assert TH.wanted(q, k, v, None, **ok)
    small = coef.clone()
    small[0, 0] = math.log(0.4)  # below MIN_ALPHA: the division would amplify rounding by 2.5x
    assert not TH.wanted(q, k, v, None, coef=small, down=down, is_causal=True)
    assert not TH.wanted(q, k, v, torch.ones(2, 1, 320, 320, dtype=torch.bool), **ok)  # a padding mask
    assert not TH.wanted(q, k, v, None, coef=coef, down=down, is_causal=False)
    assert not TH.wanted(q, k, v, None, **ok, dropout=0.1)
    assert not TH.wanted(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, **ok)  # half types keep the channels
    assert not TH.wanted(q, k, v, None, coef=coef[..., None].expand(2, 4, 320), down=down, is_causal=True)  # share
    assert not TH.wanted(q[:, :, :1], k, v, None, **ok)  # decoding
    many = down.clone()
    many[1, :40] = True  # 40 of 320 keys: over MAX_DOWN_FRACTION
    assert not TH.wanted(q, k, v, None, coef=coef, down=many, is_causal=True)
    for path in ("sdpa", "flex"):  # a forced path is kept
        with FX.use_path(path):
            assert not TH.wanted(q, k, v, None, **ok)


def test_tiny_model_steered_through_the_correction(monkeypatch):
    from ctxaware.steering import SteeringConfig, steer
    from test_steering import rendered, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    r = rendered(tok, 1)
    model = tiny_model("llama", "sdpa")
    monkeypatch.setattr(TH, "MAX_DOWN_FRACTION", 1.0)  # the tiny prompt is mostly template
    calls = []
    real = TH.attention
    monkeypatch.setattr(TH, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = SteeringConfig(alpha=0.6)
    ids = torch.tensor([r.input_ids])
    with torch.no_grad():
        with steer(model, cfg, r):
            thin = model(input_ids=ids).logits
        assert len(calls) == model.config.num_hidden_layers
        with FX.use_path("sdpa"), steer(model, cfg, r):
            channels = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    assert len(calls) == model.config.num_hidden_layers  # the forced path did not take it
    torch.testing.assert_close(thin, channels, atol=1e-5, rtol=0)
    assert (thin - plain).abs().max() > 1e-3  # and steering did something
