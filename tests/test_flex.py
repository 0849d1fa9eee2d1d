"""The compiled flex_attention path of steered attention (``ctxaware.attention.flex``).

* flex-steered output equals a float64 brute force and the SDPA-channels path to 1e-5 (fp32), for
  head dims 64 and 256, grouped-query heads, padding masks, causal, the per-query (share-rule)
  coefficient, and a ``BlockMask`` given by the model;
* no allocation during a flex call is as large as one head's ``T × T`` scores (the same probe sees
  them in the math SDPA kernel and in uncompiled flex, so it can fail);
* ``auto`` takes flex exactly where the channels would land on SDPA's math kernel at long T; a
  compile failure falls back to the channels with one warning; float64 is never sent to flex;
* a tiny Llama steered through flex (forced, and loaded with ``attn_implementation="flex_attention"``)
  gives the logits of the SDPA path.

Compiling flex costs 5–20 s per input signature on CPU with a cold inductor cache (about 70 s for
this file; its on-disk cache makes reruns fast), so the default run keeps two compiled signatures
(GQA + padding vs the brute force, the T × T probe) and the calls that compile nothing; the other
shapes, the BlockMask/softcap case, ``auto`` and the model-level checks are marked slow.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from test_measure_models import one_thread  # noqa: F401  (autouse: one torch thread)
from ctxaware.attention import flex as FX
from ctxaware.attention import functional as AF
from ctxaware.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="compiled flex_attention on CPU needs a C++ compiler (none on PATH)")


def _inputs(b, h, h_kv, t, d, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, h_kv, t, d, generator=g)
    v = torch.randn(b, h_kv, t, dv or d, generator=g)
    down = torch.rand(b, t, generator=g) < 0.5
    coef = torch.log(torch.rand(b, h, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    return q, k, v, down, coef


def _padding_mask(b, t, pads):
    """Left padding of ``pads[i]`` tokens in row i, causal; pad query rows see only themselves
    (as transformers' SDPA masks avoid fully masked rows)."""
    m = torch.ones(t, t, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    for i, p in enumerate(pads):
        m[i, :, :, :p] = False
        m[i, :, torch.arange(p), torch.arange(p)] = True
    return m


def _brute(q, k, v, mask, scaling, coef, down, causal):
    n_rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(n_rep, 1), v.double().repeat_interleave(n_rep, 1)
    c = coef.double() if coef.dim() == 3 else coef.double()[..., None]
    s = q @ k.transpose(-1, -2) * scaling + c[..., None] * down.double()[:, None, None, :]
    t = q.shape[2]
    if causal:
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


CASES = {  # name: (b, h, h_kv, t, d, padded, per-query coef)
    "d64-mha-causal": (1, 4, 4, 200, 64, False, False),
    "d64-gqa-padding": (2, 4, 2, 230, 64, True, False),
    "d64-gqa-share-coef": (2, 4, 2, 210, 64, False, True),
    "d256-one-kv-head": (2, 4, 1, 180, 256, False, False),
    "d256-gqa-padding": (2, 4, 2, 250, 256, True, False),
}


FAST = ("d64-gqa-padding",)  # the default run compiles one signature here; the others are marked slow


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_flex_equals_brute_force_and_sdpa_path(case):
    b, h, h_kv, t, d, padded, per_query = CASES[case]
    q, k, v, down, coef = _inputs(b, h, h_kv, t, d)
    if per_query:  # the target-share rule's per-query coefficient (B, H, Tq)
        coef = coef[..., None] * torch.linspace(0.0, 2.0, t, dtype=torch.float64)
    mask = _padding_mask(b, t, [0, 37][:b]) if padded else None
    scaling = d ** -0.5
    want = _brute(q, k, v, mask, scaling, coef, down, causal=mask is None)
    with FX.use_path("flex"):
        got = AF.sdpa_key_bias(q, k, v, mask, scaling=scaling, coef=coef, down=down, is_causal=True)
    assert not FX.failures(), FX.failures()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    with FX.use_path("sdpa"):
        channels = AF.sdpa_key_bias(q, k, v, mask, scaling=scaling, coef=coef, down=down, is_causal=True)
    torch.testing.assert_close(got, channels, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_flex_takes_the_models_block_mask_and_softcap():
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, h_kv, t, d = 2, 4, 2, 200, 64
    q, k, v, down, coef = _inputs(b, h, h_kv, t, d, seed=1)
    pads = torch.tensor([0, 21])

    def mod(bi, hi, qi, ki):  # transformers' flex mask: causal and key padding, in tensor ops
        return (ki <= qi) & (ki >= pads[bi])

    block_mask = create_block_mask(mod, b, None, t, t, device="cpu")
    softcap = 5.0
    out = FX.attention(q, k, v, block_mask, scaling=d ** -0.5, is_causal=True, coef=coef, down=down, softcap=softcap)
    assert out is not None, FX.failures()
    rep = h // h_kv
    s = q.double() @ k.double().repeat_interleave(rep, 1).transpose(-1, -2) * d ** -0.5
    s = torch.tanh(s / softcap) * softcap + coef.double()[..., None, None] * down.double()[:, None, None, :]
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & (torch.arange(t) >= pads[:, None])[:, None, None]
    s = s.masked_fill(~allowed, float("-inf"))
    want = s.softmax(-1).nan_to_num() @ v.double().repeat_interleave(rep, 1)
    real = allowed.any(-1)[:, 0]  # query rows with at least one key (row 1's pads have none)
    torch.testing.assert_close(out.double().permute(0, 2, 1, 3)[real], want.permute(0, 2, 1, 3)[real], atol=1e-5,
                               rtol=0)


def _largest_allocation(fn) -> int:
    """Bytes of the largest amount one op allocated itself while ``fn`` runs (torch profiler: the ops'
    self memory, plus allocations it could not attribute to an op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage for e in prof.events()]
    return max(sizes, default=0)


def test_flex_never_allocates_a_t_by_t_score_tensor():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    b, h, h_kv, t, d = 1, 2, 1, 2048, 64
    q, k, v, down, coef = _inputs(b, h, h_kv, t, d, seed=2)
    one_head = t * t * 2  # one head's scores even in half precision
    flex = lambda: FX.attention(q, k, v, None, scaling=d ** -0.5, is_causal=True, coef=coef, down=down)  # noqa: E731
    assert flex() is not None, FX.failures()  # compile outside the probe
    largest = _largest_allocation(flex)
    assert 0 < largest < one_head / 4, largest
    # the probe does see T×T scores where they exist: SDPA's math kernel and uncompiled flex
    with sdpa_kernel(SDPBackend.MATH):
        math = _largest_allocation(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True))
    assert math >= one_head
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = _largest_allocation(lambda: flex_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))
    assert eager >= one_head


@pytest.mark.slow
def test_auto_takes_flex_where_only_the_math_kernel_would_run(monkeypatch):
    calls = []
    real = FX.attention
    monkeypatch.setattr(FX, "attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    t = AF.CHUNK_QUERIES * 5  # > CHUNK_QUERIES rows and > CHUNK_MIN_SCORES scores
    q, k, v, down, coef = _inputs(1, 2, 1, t, 64, seed=3, dv=32)  # unequal q/v widths: CPU flash cannot
    assert AF.steered_kernel(q, k, v) == "math" and AF.flex_wanted(q, k, v, None)
    out = AF.sdpa_key_bias(q, k, v, None, scaling=0.125, coef=coef, down=down)
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), _brute(q, k, v, None, 0.125, coef, down, True), atol=1e-5, rtol=0)
    q, k, v, down, coef = _inputs(1, 2, 1, t, 64, seed=3)  # equal widths: the fused CPU kernel, no flex
    assert AF.steered_kernel(q, k, v) == "flash" and not AF.flex_wanted(q, k, v, None)
    assert not AF.flex_wanted(q[:, :, :64], k[:, :, :64], v[:, :, :64], None)  # short: never
    assert not AF.flex_wanted(q, k, v, None, dropout=0.1)  # flex has no dropout
    with FX.use_path("sdpa"):
        assert not AF.flex_wanted(*_inputs(1, 2, 1, t, 64, dv=32)[:3], None)


def test_compile_failure_falls_back_to_the_channels_with_a_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(FX, "_compiled", lambda: broken)
    monkeypatch.setattr(FX, "_FAILED", {})
    q, k, v, down, coef = _inputs(1, 2, 2, 100, 64, seed=4)
    with FX.use_path("flex"), caplog.at_level(logging.WARNING, logger="ctxaware.attention.flex"):
        out = AF.sdpa_key_bias(q, k, v, None, scaling=0.125, coef=coef, down=down)
        again = AF.sdpa_key_bias(q, k, v, None, scaling=0.125, coef=coef, down=down)
    torch.testing.assert_close(out.double(), _brute(q, k, v, None, 0.125, coef, down, True), atol=1e-5, rtol=0)
    assert torch.equal(out, again)
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()  # once per signature
    assert list(FX.failures().values()) == ["no C++ compiler"]


def test_float64_is_never_sent_to_flex(monkeypatch):
    monkeypatch.setattr(FX, "_compiled", lambda: pytest.fail("float64 reached flex"))
    q, k, v, down, coef = (x.double() if x.is_floating_point() else x for x in _inputs(1, 2, 2, 60, 64, seed=5))
    with FX.use_path("flex"):
        out = AF.sdpa_key_bias(q, k, v, None, scaling=0.125, coef=coef, down=down)
    torch.testing.assert_close(out, _brute(q, k, v, None, 0.125, coef, down, True), atol=1e-10, rtol=0)


def test_path_selection_and_buckets(monkeypatch):
    assert FX.current_path() == "auto"
    with FX.use_path("sdpa"):
        assert FX.current_path() == "sdpa"
        with FX.use_path("flex"):
            assert FX.current_path() == "flex"
        assert FX.current_path() == "sdpa"
    monkeypatch.setenv("CTXAWARE_ATTENTION_PATH", "flex")
    assert FX.current_path() == "flex"
    monkeypatch.setenv("CTXAWARE_ATTENTION_PATH", "fast")
    with pytest.raises(ConfigError, match="'fast'"):
        FX.current_path()
    with pytest.raises(ConfigError, match="'fast'"):
        with FX.use_path("fast"):
            pass
    sizes = [FX.bucket(n) for n in range(1, 20000, 7)]
    assert all(s >= n and s % FX.BLOCK == 0 for s, n in zip(sizes, range(1, 20000, 7)))
    assert all(s <= max(1.25 * n, n + FX.BLOCK) + FX.BLOCK for s, n in zip(sizes, range(1, 20000, 7)))
    assert len(set(sizes)) < 30  # few compiled shapes for lengths up to 20k


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    return model


@pytest.mark.slow
def test_model_steered_through_flex_equals_sdpa_path():
    """Forced flex (model on sdpa) and a model loaded with flex_attention (ctxaware_flex) give the
    SDPA path's steered logits, left-padded batch included; steering changes them."""
    from ctxaware.steering import steer

    model = _tiny_llama()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, :7] = 0
    emph = torch.zeros(2, 40, dtype=torch.bool)
    emph[:, 10:25] = True
    real = am.bool()

    def logits(path):
        with torch.no_grad(), FX.use_path(path), steer(model, emphasis=emph, alpha=0.3):
            return model(input_ids=ids, attention_mask=am).logits[real]

    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am).logits[real]
    want = logits("sdpa")
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(logits("flex"), want, atol=1e-5, rtol=0)
    model.set_attn_implementation("flex_attention")
    torch.testing.assert_close(logits("auto"), want, atol=1e-5, rtol=0)
    assert not FX.failures(), FX.failures()


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.9, 0.01])
def test_bf16_flex_equals_the_channel_path(alpha):
    """In bf16 the flex bias is added in float32: its output equals the hi/lo channel path's (both
    only round the output), and both are as close to the float64 brute force as plain bf16 SDPA is."""
    import math

    b, h, h_kv, t, d = 1, 4, 2, 300, 64
    q, k, v, down, _ = _inputs(b, h, h_kv, t, d, seed=6)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    coef = torch.full((b, h), math.log(alpha), dtype=torch.float64)
    with FX.use_path("flex"):
        flex = AF.sdpa_key_bias(q, k, v, None, scaling=d ** -0.5, coef=coef, down=down)
    with FX.use_path("sdpa"):
        channels = AF.sdpa_key_bias(q, k, v, None, scaling=d ** -0.5, coef=coef, down=down)
    assert flex.dtype == torch.bfloat16
    torch.testing.assert_close(flex.float(), channels.float(), atol=2 ** -7, rtol=0)
    want = _brute(q, k, v, None, d ** -0.5, coef, down, True)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    plain_err = (plain.transpose(1, 2).double() - _brute(q, k, v, None, d ** -0.5, coef * 0, down, True)).abs().max()
    assert (flex.double() - want).abs().max() <= 2 * plain_err
