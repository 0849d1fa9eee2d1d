"""Steered prefill as a correction of the plain kernel's output (``attention.thin``).

* equal to a float64 brute force (fp32 to 1e-6, fp64 to 1e-12): grouped-query heads, rows with
  different down-weighted keys, unsteered heads (α = 1) and the smallest α taken (0.5);
* taken only where it is safe: α ≥ 0.5, fp32/fp64 on CPU, causal prefill without a padding mask,
  the fixed-α rule, few down keys, the ``auto`` path;
* a tiny model steered through it gives the padded channels' logits, and it is what ran;
* bf16/fp16 through it for α ≥ 0.8: error within 2× plain attention's own,
  against float64, also with an attention sink among the down keys;
* the dispatch (which log-sum-exp op, eager or compiled correction, thin or channels) for CPU and
  CUDA, with the device faked only at the decision functions; the op fallback chain with a fake call;
* the compiled correction (one test compiles) equals the eager one, for other lengths and numbers
  of down keys without recompiling, and falls back to eager ops, logged once, where compiling fails;
* a steered prefill builds the down-key index once per forward pass, not once per layer.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_measure_models import one_thread  # noqa: F401  (autouse: one torch thread)
from ctxaware.attention import flex as FX
from ctxaware.attention import functional as AF
from ctxaware.attention import fused as FU
from ctxaware.attention import lse as LS
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


def test_correction_by_chunks_of_query_rows(monkeypatch):
    """Long prompts are corrected CHUNK_ROWS query rows at a time: the same output."""
    q, k, v, down, coef = _inputs(torch.float32)
    whole = TH.attention(q, k, v, scaling=0.25, coef=coef, down=down)
    monkeypatch.setattr(TH, "CHUNK_ROWS", 96)  # 320 rows: chunks of 96, 96, 96, 32
    torch.testing.assert_close(TH.attention(q, k, v, scaling=0.25, coef=coef, down=down), whole, atol=1e-6, rtol=0)


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
    assert not TH.wanted(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, **ok)  # alpha 0.5 in half types
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


def _sink_inputs(dtype, sink, t=512, seed=0, n_down=12):
    """Random q/k/v (4 query heads on 2 kv heads, head dim 64) where key 0, a down key, is a strong
    attention sink when ``sink`` > 0 (as the first token of a chat prompt)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, 4, 64, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(1, 2, t, 64, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, t, 64, generator=g, dtype=torch.float64)
    u = torch.randn(64, generator=g, dtype=torch.float64)
    u = u / u.norm()
    q, k = q + sink * u, k.clone()
    k[:, :, 0] += sink * u
    down = torch.zeros(1, t, dtype=torch.bool)
    down[:, :n_down] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), down


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_correction_within_twice_plain_error(dtype):
    """Largest error relative to the output's scale, against float64 on the same rounded inputs:
    the steered bf16/fp16 output through the correction stays within 2x plain attention's own."""
    scaling = 64 ** -0.5
    for sink in (0.0, 6.0):
        q, k, v, down = _sink_inputs(dtype, sink)
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                 enable_gqa=True).transpose(1, 2)
        plain_ref = _brute(q, k, v, down, torch.zeros(1, 4, dtype=torch.float64), scaling)
        plain_err = ((plain.double() - plain_ref).abs().max() / plain_ref.abs().max()).item()
        for alpha in (0.8, 0.9, 0.95):
            coef = torch.full((1, 4), math.log(alpha), dtype=torch.float64)
            assert TH.wanted(q, k, v, None, coef=coef, down=down, is_causal=True)
            out = TH.attention(q, k, v, scaling=scaling, coef=coef, down=down, mode="eager")
            assert out is not None and out.dtype == dtype and out.shape == (1, 512, 4, 64)
            ref = _brute(q, k, v, down, coef, scaling)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            assert err <= 2.0 * plain_err, (sink, alpha, err, plain_err)
            if alpha == 0.8:  # steering mattered, far beyond the rounding
                assert (ref - plain_ref).abs().max() > 5 * plain_err * plain_ref.abs().max()
        assert not _gate(device_type="cuda", dtype=dtype, coef_min=math.log(0.7))  # below HALF_MIN_ALPHA


def _gate(**over):
    base = dict(device_type="cpu", dtype=torch.float32, tq=4096, tk=4096, head_dim=64, value_dim=64, grouped=True,
                coef_min=math.log(0.9), coef_max=0.0, n_down=40)
    return TH.gate(**{**base, **over})


def test_dispatch_per_device_dtype_alpha_and_down_keys():
    """Thin or channels, from numbers alone: CPU fp32/fp64 from α 0.5, half types (CPU and CUDA)
    and CUDA fp32 from α 0.8, CUDA fp64 and other devices never, never with more than 1/32 of the
    keys down."""
    a = math.log
    assert _gate() and _gate(coef_min=a(0.5)) and _gate(dtype=torch.float64, coef_min=a(0.5))
    assert not _gate(coef_min=a(0.45))
    for dtype in (torch.bfloat16, torch.float16):
        assert _gate(device_type="cuda", dtype=dtype, coef_min=a(0.8))
        assert not _gate(device_type="cuda", dtype=dtype, coef_min=a(0.7))
        assert _gate(dtype=dtype, coef_min=a(0.8)) and not _gate(dtype=dtype, coef_min=a(0.7))  # CPU alike
    assert _gate(device_type="cuda", coef_min=a(0.8)) and not _gate(device_type="cuda", coef_min=a(0.5))
    assert not _gate(device_type="cuda", dtype=torch.float64)
    assert not _gate(device_type="mps") and not _gate(device_type="meta")
    assert not _gate(n_down=4096 // 32 + 1) and _gate(n_down=4096 // 32)
    assert not _gate(tq=1, tk=4096) and not _gate(tq=100, tk=4096)  # decoding, a static cache
    assert not _gate(masked=True) and not _gate(causal=False) and not _gate(dropout=0.1)
    assert not _gate(fixed_alpha=False) and not _gate(path="sdpa") and not _gate(path="flex")
    assert not _gate(coef_max=0.1)  # an up-weighting is not a down-weighting
    assert not _gate(value_dim=32)  # the CPU flash kernel needs equal head dims


def test_log_sum_exp_ops_per_device():
    """Which fused op gives the log-sum-exp: CPU flash on CPU; on CUDA flash (grouped heads first as
    they are) then cuDNN in half types, memory-efficient for fp32 and as the last resort."""
    assert LS.candidates("cpu", torch.bfloat16, 64, 64, True) == [("cpu_flash", False)]
    assert LS.candidates("cuda", torch.bfloat16, 64, 64, True) == [
        ("flash", False), ("flash", True), ("cudnn", True), ("efficient", True)]
    assert LS.candidates("cuda", torch.float16, 128, 128, False) == [
        ("flash", False), ("cudnn", False), ("efficient", False)]
    assert LS.candidates("cuda", torch.float32, 64, 64, True) == [("efficient", True)]
    assert LS.candidates("cuda", torch.bfloat16, 264, 264, False)[0][0] == "cudnn"  # over flash's 256
    assert LS.candidates("cuda", torch.float64, 64, 64, False) == [] and LS.candidates("mps", torch.float32, 64, 64,
                                                                                          False) == []
    # plain SDPA's own backend goes first: cuDNN (grouped heads as they are, then expanded), then the rest
    assert LS.candidates("cuda", torch.bfloat16, 64, 64, True, preferred="cudnn") == [
        ("cudnn", False), ("cudnn", True), ("flash", False), ("flash", True), ("efficient", True)]
    assert LS.candidates("cuda", torch.bfloat16, 64, 64, True, preferred="efficient")[0] == ("efficient", True)
    assert LS.sdpa_choice(*_inputs(torch.float32)[:3], 0.25) == "flash"  # CPU: its flash kernel


def test_log_sum_exp_fallback_chain(monkeypatch):
    """An op that raises, or gives a log-sum-exp that fails the first-row check (here in base 2), is
    skipped and never retried; the next op's real result is used."""
    LS.reset()
    monkeypatch.setattr(LS, "candidates", lambda *a: [("flash", False), ("cudnn", True), ("efficient", True)])
    calls = []

    def fake(op, q, k, v, scaling):
        calls.append((op, k.shape[1]))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scaling)
        if op == "flash":
            raise RuntimeError("No available kernel")
        return (out, lse / math.log(2)) if op == "cudnn" else (out, lse)

    q, k, v, _, _ = _inputs(torch.float32)
    try:
        for _ in range(2):
            out, lse, op = LS.plain_with_lse(q, k, v, 0.25, call=fake)
            assert op == "efficient"
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
        torch.testing.assert_close(out, plain)
        # flash got grouped heads as they are, the others expanded ones; the failed ones ran once
        assert calls == [("flash", 2), ("cudnn", 4), ("efficient", 4), ("efficient", 4)]
    finally:
        LS.reset()


def test_correction_mode_choice(monkeypatch):
    """auto compiles on CUDA for large calls and stays eager on CPU (measured no faster there); a
    forced mode wins; a device whose compile failed is eager from then on."""
    monkeypatch.setattr(FU, "_FAILED", {})
    big = FU.COMPILE_MIN_ROWS
    assert FU.chosen("cuda", big, "auto") == "compiled" and FU.chosen("cuda", big - 1, "auto") == "eager"
    assert FU.chosen("cpu", 10 * big, "auto") == "eager"
    assert FU.chosen("cpu", 1, "compiled") == "compiled" and FU.chosen("cuda", 10 * big, "eager") == "eager"
    with FU.use_mode("compiled"):
        assert FU.current_mode() == "compiled"
    FU._FAILED["cuda"] = "no triton"
    assert FU.chosen("cuda", 10 * big, "compiled") == "eager"
    assert AF.mask_dtype_for("cuda", torch.bfloat16) == torch.bfloat16  # CUDA decoding: a same-dtype mask
    assert AF.mask_dtype_for("cpu", torch.bfloat16) == torch.float32


def test_compiled_correction_equals_eager_without_recompiling():
    """The one test that compiles: other lengths and numbers of down keys reuse the compiled code."""
    from torch._dynamo.utils import counters

    if FU.failures():
        pytest.skip(f"the compiled correction failed earlier in this process: {FU.failures()}")
    scaling = 0.25
    for i, (t, n_down) in enumerate([(320, 7), (448, 11), (384, 9)]):
        q, k, v, down, coef = _inputs(torch.float32, t=t, seed=i)
        down[0, :n_down] = True
        eager = TH.attention(q, k, v, scaling=scaling, coef=coef, down=down, mode="eager")
        graphs = counters["stats"]["unique_graphs"]
        compiled = TH.attention(q, k, v, scaling=scaling, coef=coef, down=down, mode="compiled")
        assert not FU.failures(), FU.failures()
        if i:
            assert counters["stats"]["unique_graphs"] == graphs, "recompiled for a new length"
        assert compiled.shape == eager.shape and compiled.is_contiguous()
        torch.testing.assert_close(compiled, eager, atol=2e-6, rtol=0)
        torch.testing.assert_close(compiled.double(), _brute(q, k, v, down, coef, scaling), atol=1e-6, rtol=0)
    assert FU.compile_seconds()["cpu"] > 0


def test_compile_failure_falls_back_to_eager_once(monkeypatch, caplog):
    monkeypatch.setattr(FU, "_FAILED", {})
    monkeypatch.setattr(FU, "_COMPILED", {"cpu": lambda *a: (_ for _ in ()).throw(RuntimeError("no compiler"))})
    q, k, v, down, coef = _inputs(torch.float32)
    with caplog.at_level("WARNING", logger=FU.__name__):
        outs = [TH.attention(q, k, v, scaling=0.25, coef=coef, down=down, mode="compiled") for _ in range(3)]
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    assert FU.failures() == {"cpu": "no compiler"}
    eager = TH.attention(q, k, v, scaling=0.25, coef=coef, down=down, mode="eager")
    for out in outs:
        assert torch.equal(out, eager)


def test_prefill_builds_the_down_key_index_once(monkeypatch):
    """Every layer of a steered prefill reuses one down-key index (and the gate reads no device
    tensor per layer): one build per forward pass, one correction per layer."""
    from ctxaware.steering import SteeringConfig, steer
    from test_steering import rendered, tiny_model, tiny_tokenizer

    r = rendered(tiny_tokenizer(), 1)
    model = tiny_model("llama", "sdpa", layers=4)
    monkeypatch.setattr(TH, "MAX_DOWN_FRACTION", 1.0)
    builds, corrections = [], []
    real_index, real_attention = TH.down_index, TH.attention
    monkeypatch.setattr(TH, "down_index", lambda down: builds.append(1) or real_index(down))
    monkeypatch.setattr(TH, "attention", lambda *a, **kw: corrections.append(kw.get("index")) or real_attention(*a, **kw))
    ids = torch.tensor([r.input_ids])
    with torch.no_grad(), steer(model, SteeringConfig(alpha=0.6), r):
        model(input_ids=ids)
        assert len(builds) == 1 and len(corrections) == 4
        assert all(c is corrections[0] for c in corrections)  # the same cached index object
        model(input_ids=ids)  # the next forward of the same length reuses it too
        assert len(builds) == 1 and len(corrections) == 8


def test_decode_mask_buffer_is_passed_without_a_copy(monkeypatch):
    """A decoding step whose bias buffer already has the mask dtype hands SDPA a view of that
    buffer (no per-step copy), with grouped query heads packed as rows."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(AF.F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    buf = torch.randn(1, 4, 1, 64)
    out = AF.sdpa_decode_mask(q, k, v, None, scaling=0.25, add=buf[..., :40])
    assert seen[0].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    ref = real(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=buf[..., :40], scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_bf16_mask_rounds_log_alpha_within_its_bound():
    """CUDA decoding takes the bias in the query's dtype: log α rounded to bf16 moves the weight α by
    at most |log α| · 2^-8 relative (fp16: 2^-11), and SDPA with that mask gives exactly the rounded α."""
    for alpha in (0.99, 0.95, 0.9, 0.8, 0.5, 0.1, 0.01):
        for dtype, unit in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
            rounded = torch.tensor(math.log(alpha), dtype=torch.float64).to(dtype).double().item()
            assert abs(math.exp(rounded) / alpha - 1) <= abs(math.log(alpha)) * unit * 1.01
    t, d = 64, 64  # 63 down keys and one plain key at equal scores, values the down indicator
    q, k = torch.zeros(1, 1, 1, d), torch.zeros(1, 1, t, d)
    down = torch.zeros(1, t, dtype=torch.bool)
    down[0, :63] = True
    v = down.float()[:, None, :, None].expand(1, 1, t, d)
    add = AF.additive_bias(torch.full((1, 1), math.log(0.9), dtype=torch.float64), down).to(torch.bfloat16)
    eff = math.exp(add.double().min().item())
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add.float(), scale=d ** -0.5)
    assert abs(out[0, 0, 0, 0].item() - 63 * eff / (63 * eff + 1)) < 1e-6
    assert abs(eff - 0.9) > 5e-5 and abs(eff / 0.9 - 1) < 1.2e-4  # 0.89990: 1.1e-4 of the weight
