"""The padded steering channels: fused-kernel eligibility, exactness, and the bias's precision.

* shapes: the padded q/k/v widths meet PyTorch's documented fused-kernel constraints for every
  common head dim and dtype (``kernels.kernel_for``), where the old one-channel widths did not;
* the CPU predicate agrees with PyTorch itself (the chosen kernel runs under ``sdpa_kernel``);
* results equal the unpadded math (float64 brute force) to 1e-6 in fp32/fp64, chunked fallback too;
* effective α from the scores of the actual bf16/fp16 tensors: within 0.1 % down to α = 0.01
  (the single rounded channel is not — the test can tell).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from test_measure_models import one_thread  # noqa: F401  (autouse: one torch thread)
from ctxaware.attention import functional as AF
from ctxaware.attention.kernels import kernel_for


def _inputs(b=2, h=4, h_kv=2, t=24, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64).to(dtype)
    down = torch.rand(b, t, generator=g) < 0.5
    coef = torch.log(torch.tensor([[0.3, 0.01, 1.0, 0.05], [0.9, 0.2, 0.5, 0.02]], dtype=torch.float64))[:b, :h]
    return q, k, v, down, coef


def _brute(q, k, v, mask, scaling, coef, down, causal):
    n_rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(n_rep, 1), v.double().repeat_interleave(n_rep, 1)
    s = q @ k.transpose(-1, -2) * scaling + coef.double()[:, :, None, None] * down.double()[:, None, None, :]
    t = q.shape[2]
    if causal:
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_padded_widths_keep_a_fused_cuda_kernel(head_dim, dtype):
    q, k, v, down, coef = _inputs(b=1, d=head_dim, dtype=dtype, t=4)
    qc, kc = AF.bias_channels(coef[:1], down, scaling=head_dim ** -0.5, dtype=dtype, head_dim=head_dim,
                              target="cuda")
    q2, k2, v2 = AF.padded_qkv(q, k, v, qc, kc, target="cuda")
    width = q2.shape[-1]
    assert width == k2.shape[-1] == v2.shape[-1] > head_dim
    assert width % (8 if dtype != torch.float32 else 4) == 0
    # with a padding mask: the memory-efficient kernel; without one (causal), flash in half types up to 256
    assert kernel_for(q2.shape, k2.shape, v2.shape, dtype, "cuda", mask="bool") == "efficient"
    no_mask = kernel_for(q2.shape, k2.shape, v2.shape, dtype, "cuda")
    assert no_mask == ("flash" if dtype != torch.float32 and width <= 256 else "efficient")
    # the old one-channel width fell to the math kernel (the case issue 11 found)
    old = (*q.shape[:-1], head_dim + 1)
    assert kernel_for(old, old, old, dtype, "cuda", mask="bool") == "math"
    # the parts of the split bias fit in the padding
    assert qc.shape[-1] == AF.channel_parts(head_dim, dtype, "cuda") <= width - head_dim
    # on CPU only the needed channels are added (its flash kernel takes any width)
    assert AF.padded_width(head_dim, dtype, "cpu") == head_dim + AF.channel_parts(head_dim, dtype, "cpu")


@pytest.mark.filterwarnings("ignore:.*(Flash attention|fused kernels).*:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dv,dropout", [(64, 0.0), (32, 0.0), (64, 0.1)])
def test_cpu_predicate_agrees_with_pytorch(dtype, dv, dropout):
    q, k, v, down, coef = _inputs(d=64, dtype=dtype)
    v = v[..., :dv]
    predicted = kernel_for(q.shape, k.shape, v.shape, dtype, "cpu", dropout=dropout)
    backend = SDPBackend.FLASH_ATTENTION if predicted == "flash" else SDPBackend.MATH
    with sdpa_kernel([backend]):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=True)
    if predicted == "math":
        with pytest.raises(RuntimeError), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=True)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("masked", [False, True])
def test_padded_channels_equal_unpadded_math(dtype, atol, masked):
    q, k, v, down, coef = _inputs(dtype=dtype)
    scaling = 64 ** -0.5
    t = q.shape[2]
    mask = None
    if masked:  # left padding of row 1 plus the causal triangle, as sdpa_mask builds it
        mask = torch.ones(2, 1, t, t, dtype=torch.bool).tril()
        mask[1, :, :, :5] = False
        mask[1, :, :5, :5] = torch.eye(5, dtype=torch.bool)  # padded queries see themselves (no NaN)
    qc, kc = AF.bias_channels(coef, down, scaling=scaling, dtype=dtype, head_dim=64)
    out = AF.sdpa_channels(q, k, v, mask, scaling=scaling, q_channels=qc, k_channels=kc, is_causal=True)
    want = _brute(q, k, v, mask, scaling, coef, down, causal=not masked)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=0)
    q2, k2, v2 = AF.padded_qkv(q, k, v, qc, kc)
    assert kernel_for(q2.shape, k2.shape, v2.shape, dtype, "cpu", mask="bool" if masked else None) == "flash"


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_fallback_equals_one_call(monkeypatch, masked):
    q, k, v, down, coef = _inputs(dtype=torch.float64, t=40)
    scaling = 64 ** -0.5
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril() if masked else None
    qc, kc = AF.bias_channels(coef, down, scaling=scaling, dtype=torch.float64, head_dim=64)
    full = AF.sdpa_channels(q, k, v, mask, scaling=scaling, q_channels=qc, k_channels=kc, is_causal=True)
    calls = []
    real = AF._chunked
    monkeypatch.setattr(AF, "CHUNK_QUERIES", 16)
    monkeypatch.setattr(AF, "CHUNK_MIN_SCORES", 100)
    monkeypatch.setattr(AF, "kernel_for", lambda *a, **kw: "math")  # as if no fused kernel took the shape
    monkeypatch.setattr(AF, "_chunked", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    chunked = AF.sdpa_channels(q, k, v, mask, scaling=scaling, q_channels=qc, k_channels=kc, is_causal=True)
    assert len(calls) == 1
    torch.testing.assert_close(chunked, full, atol=1e-12, rtol=0)
    torch.testing.assert_close(full, _brute(q, k, v, mask, scaling, coef, down, causal=not masked), atol=1e-10, rtol=0)


def _effective_alpha(dtype, alpha, parts=None, head_dim=64, target=None):
    """α the kernel sees: exp(score difference N vs unsteered), from the actual padded tensors in float64."""
    q, k, v, _, _ = _inputs(b=1, h=1, h_kv=1, t=8, d=head_dim, dtype=dtype)
    down = torch.tensor([[True] * 4 + [False] * 4])
    scaling = head_dim ** -0.5
    coef = torch.full((1, 1), math.log(alpha), dtype=torch.float64)
    qc, kc = AF.bias_channels(coef, down, scaling=scaling, dtype=dtype, head_dim=head_dim, target=target)
    if parts is not None:
        qc, kc = qc[..., :parts], kc[..., :parts]
    q2, k2, _ = AF.padded_qkv(q, k, v, qc, kc, target=target)
    steered = scaling * (q2.double() @ k2.double().transpose(-1, -2))
    plain = scaling * (q.double() @ k.double().transpose(-1, -2))
    diff = (steered - plain)[0, 0]  # (Tq, Tk): log α on the N keys, 0 on the others
    assert torch.equal(diff[:, 4:], torch.zeros_like(diff[:, 4:]))
    return diff[:, :4].exp()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.01, 0.02, 0.05, 0.3, 0.9, 0.95])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_effective_alpha_exact_in_half_precision(dtype, alpha, head_dim, target):
    eff = _effective_alpha(dtype, alpha, head_dim=head_dim, target=target)
    assert ((eff / alpha - 1).abs() <= 1e-3).all(), eff


def test_single_rounded_channel_is_not_exact_in_bf16():
    errors = [float((_effective_alpha(torch.bfloat16, a, parts=1) / a - 1).abs().max()) for a in (0.01, 0.02, 0.05)]
    assert max(errors) > 1e-3  # what the split fixes (about 0.9 % in issue 11)


def test_half_precision_prefill_probabilities_keep_alpha():
    """End to end in bf16: SDPA mass on N from an indicator value channel vs float64 math of the same inputs."""
    q, k, v, _, _ = _inputs(b=1, h=2, h_kv=1, t=16, d=64, dtype=torch.bfloat16)
    down = torch.zeros(1, 16, dtype=torch.bool)
    down[0, 2:9] = True
    alpha, scaling = 0.01, 64 ** -0.5
    coef = torch.full((1, 2), math.log(alpha), dtype=torch.float64)
    qc, kc = AF.bias_channels(coef, down, scaling=scaling, dtype=torch.bfloat16, head_dim=64)
    ind = down.to(torch.bfloat16)[:, None, :, None].expand(1, 1, 16, 64).contiguous()
    out = AF.sdpa_channels(q, k, ind, None, scaling=scaling, q_channels=qc, k_channels=kc, is_causal=True)
    exact = _brute(q, k, ind, None, scaling, coef, down, causal=True)
    # the output is bf16 (2^-8 relative); the bias error would add ~1 % at alpha 0.01
    torch.testing.assert_close(out.double(), exact, atol=4e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_steers_through_prefill_and_decode(dtype):
    """A tiny bf16/fp16 model: KV-cache decoding (a float32 mask on CPU) matches full recompute, and steering
    in half precision lands where float32 steering does (to half-precision noise)."""
    from ctxaware.steering import SteeringConfig, steer
    from test_steering import generate_steered, rendered, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    r = rendered(tok, 1)
    model32 = tiny_model("llama", "sdpa")
    model = tiny_model("llama", "sdpa").to(dtype)
    cfg = SteeringConfig(alpha=0.05)
    out = generate_steered(model, tok, cfg, r, 4)
    ids = torch.tensor([r.input_ids])
    with steer(model, cfg, r), torch.no_grad():
        full = model(input_ids=out.sequences).logits.float()
    p = len(r)
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0].float(), full[0, p - 1 + step], atol=0.15, rtol=0.02)
    with torch.no_grad():
        plain32 = model32(input_ids=ids).logits
        with steer(model32, cfg, r):
            steered32 = model32(input_ids=ids).logits
        with steer(model, cfg, r):
            steered = model(input_ids=ids).logits.float()
    effect = (steered32 - plain32).abs().max()
    assert effect > 0.2  # alpha 0.05 moves these logits clearly ...
    assert (steered - steered32).abs().max() < effect / 4  # ... and half precision follows float32


def test_decode_mask_dtype_per_device_and_dtype():
    """One-token decoding: a mask of the query's dtype in fp32/fp64, a float32 mask for half types on
    CPU, and the padded channels (None) for half types elsewhere (here: the meta device)."""
    for dtype in (torch.float32, torch.float64):
        assert AF.decode_mask_dtype(torch.zeros(1, 1, 1, 8, dtype=dtype)) == dtype
    for dtype in (torch.bfloat16, torch.float16):
        assert AF.decode_mask_dtype(torch.zeros(1, 1, 1, 8, dtype=dtype)) == torch.float32
        assert AF.decode_mask_dtype(torch.zeros(1, 1, 1, 8, dtype=dtype, device="meta")) is None


def test_half_precision_decode_mask_keeps_alpha_exact():
    """bf16 decoding through the float mask: 63 down-weighted keys and one plain key at equal scores,
    values the down indicator, so the output is 63α / (63α + 1). With the float32 mask it is that
    value to one bf16 step; a bf16 mask (log α rounded) misses it by more (at α = 0.01)."""
    t, d = 64, 64
    q = torch.zeros(1, 3, 1, d, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, t, d, dtype=torch.bfloat16)
    down = torch.zeros(1, t, dtype=torch.bool)
    down[0, :63] = True
    v = down.to(torch.bfloat16)[:, None, :, None].expand(1, 1, t, d).contiguous()
    for alpha in (0.01, 0.02, 0.05):
        exact = 63 * alpha / (63 * alpha + 1)
        add = AF.additive_bias(torch.full((1, 3), math.log(alpha), dtype=torch.float64), down)
        out = AF.sdpa_decode_mask(q, k, v, None, scaling=d ** -0.5, add=add)
        assert out.shape == (1, 1, 3, d) and out.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(exact))
        assert (out.double() - exact).abs().max() <= ulp, (alpha, out[0, 0, :, 0], exact)
    add = AF.additive_bias(torch.full((1, 1), math.log(0.01), dtype=torch.float64), down)
    rounded = F.scaled_dot_product_attention(q[:, :1], k, v, attn_mask=add.to(torch.bfloat16))
    exact = 63 * 0.01 / (63 * 0.01 + 1)
    ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(exact))
    assert (rounded.double() - exact).abs().max() > ulp  # what the float32 mask avoids
