"""Attention steering: invariants on tiny random Llama/Qwen2 models (and, marked slow, the embedded model).

The reference every steered output is compared with is brute force and independent of
``ctxaware.attention``: a registered attention function that computes the eager attention
probabilities in float64, multiplies those of non-emphasised prompt keys by ``alpha`` (per steered
head; ``alpha ** (i + 1)`` under reference compounding), renormalises each row, and applies them.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from ctxaware.attention import backend
from ctxaware.chat import render
from ctxaware.errors import ConfigError, SteeringError
from ctxaware.steering import SteeredModel, SteeringConfig, emphasis_mask, steer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is the capital.",
    "Read the passage below and answer the question.\nThe passage: cats sleep a lot.",
    "Hello! How can I help you today?", "system user assistant", "0123456789 ,.;:!?'\"()[]{}<>",
]
VOCAB = 300
CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Read the passage: cats sleep a lot. What do cats do?"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "How can I help you today?"},
     {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Summarise."}],
]


# ----------------------------------------------------------------------------- fixtures
@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A 300-token byte-level BPE trained in memory, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


def tiny_model(kind: str = "llama", impl: str = "sdpa", layers: int = 3, seed: int = 0, **extra):
    """Random tiny causal LM (float32, eval) with GQA: 4 query heads sharing 2 kv heads."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, **extra)
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    with torch.no_grad():  # sharper attention than the default init, so steering changes something
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _models(kind: str):
    return {"sdpa": tiny_model(kind, "sdpa"), "eager": tiny_model(kind, "eager")}


@pytest.fixture(params=["llama", "qwen2"])
def models(request):
    return _models(request.param)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they lose a lot."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def rendered(tok, i: int = 0):
    return render(tok, CONVERSATIONS[i], add_generation_prompt=True)


def logits(model, ids, **kwargs):
    ids = torch.as_tensor(ids)
    with torch.no_grad():
        return model(input_ids=ids[None] if ids.dim() == 1 else ids, **kwargs).logits


# ----------------------------------------------------------------------------- reference
_REF: dict = {}
REF_NAME = "ctxaware_test_reference"


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Brute force: float64 eager probabilities, reweighted by alpha on down-weighted keys, renormalised."""
    n_rep = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(n_rep, 1), value.double().repeat_interleave(n_rep, 1)
    scores = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]].double()
    probs = scores.softmax(-1)
    exponents = _REF.get("exponents", {}).get(module.layer_idx)  # (H,) power of alpha per query head
    if exponents is not None:
        b, t = probs.shape[0], probs.shape[-1]
        emph = _REF["emphasis"]
        prompt_len = emph.shape[1]
        down = torch.zeros(b, t, dtype=torch.bool)
        n = min(prompt_len, t)
        down[:, :n] = ~emph[:, :n]
        if _REF.get("down_generated"):  # the WRONG rule, to show the test can tell
            down[:, prompt_len:] = True
        w = torch.where(down[:, None, None, :], _REF["alpha"] ** exponents.double().view(1, -1, 1, 1),
                        torch.ones((), dtype=torch.float64))
        probs = probs * w
        probs = probs / probs.sum(-1, keepdim=True)
    out = (probs @ v).to(query.dtype).transpose(1, 2).contiguous()
    return out, probs.to(query.dtype)


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REF_NAME, _reference_attention)
    AttentionMaskInterface.register(REF_NAME, eager_mask)


def reference_logits(model, ids, emphasis, alpha, heads="all", compounding="none", down_generated=False,
                     **forward_kwargs):
    """Logits of ``model`` with brute-force steering (model's own attention restored afterwards)."""
    _register_reference()
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    resolved = SteeringConfig(heads=heads).resolve_heads(n_layers, n_heads)
    exponents = {}
    for i, layer in enumerate(sorted(resolved)):
        e = torch.zeros(n_heads, dtype=torch.float64)
        e[resolved[layer] if resolved[layer] is not None else slice(None)] = (i + 1) if compounding == "reference" else 1
        exponents[layer] = e
    saved = model.config._attn_implementation
    _REF.update(exponents=exponents, emphasis=torch.as_tensor(emphasis).reshape(-1, torch.as_tensor(emphasis).shape[-1]),
                alpha=float(alpha), down_generated=down_generated)
    model.config._attn_implementation = REF_NAME
    try:
        return logits(model, ids, **forward_kwargs)
    finally:
        model.config._attn_implementation = saved
        _REF.clear()


def user_mask(r) -> torch.Tensor:
    return emphasis_mask(r, ("user",))


def state_snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(c): c._attn_implementation for c in [model.config, *[m.config for m in model.modules()
                                                                     if hasattr(m, "config")]]})


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_alpha_one_is_bit_identical(models, tok, impl):
    model, r = models[impl], rendered(tok)
    base = logits(model, r.input_ids)
    with steer(model, SteeringConfig(alpha=1.0), r) as plan:
        assert plan is None
        assert model.config._attn_implementation == impl
        same = logits(model, r.input_ids)
    assert torch.equal(base, same)


@pytest.mark.parametrize("heads,compounding", [("all", "none"), ("1:0,3;2", "none"), ("0,2", "reference")])
def test_steered_sdpa_and_eager_equal_brute_force(models, tok, heads, compounding):
    r = rendered(tok)
    cfg = SteeringConfig(alpha=0.3, heads=heads, compounding=compounding)
    ref = reference_logits(models["eager"], r.input_ids, user_mask(r), 0.3, heads, compounding)
    out = {}
    for impl in ("sdpa", "eager"):
        with steer(models[impl], cfg, r):
            out[impl] = logits(models[impl], r.input_ids)
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["sdpa"], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["eager"], ref, atol=1e-5, rtol=0)
    unsteered = logits(models["sdpa"], r.input_ids)
    assert (out["sdpa"] - unsteered).abs().max() > 1e-2  # steering did something measurable


def test_reference_compounding_multiplies_log_alpha_by_rank(models, tok):
    r = rendered(tok)
    model = models["sdpa"]
    cfg = SteeringConfig(alpha=0.7, heads="0,2", compounding="reference")
    with steer(model, cfg, r) as plan:
        assert set(plan.head_scale) == {0, 2}
        assert torch.equal(plan.head_scale[0], torch.ones(1, 4)) and torch.equal(plan.head_scale[2], torch.full((1, 4), 2.0))
        assert plan.log_alpha.tolist() == pytest.approx([math.log(0.7)])
        compounded = logits(model, r.input_ids)
    # the same as steering layer 2 alone with alpha**2 on top of layer 0 with alpha
    explicit = reference_logits(models["eager"], r.input_ids, user_mask(r), 0.7, "0,2", "reference")
    torch.testing.assert_close(compounded, explicit, atol=1e-5, rtol=0)
    with steer(model, cfg.replace(compounding="none"), r):
        plain = logits(model, r.input_ids)
    assert (plain - compounded).abs().max() > 1e-3
    assert SteeringConfig(compounding="reference").layer_multipliers([5, 1, 3]) == {1: 1.0, 3: 2.0, 5: 3.0}
    assert SteeringConfig().layer_multipliers([5, 1, 3]) == {1: 1.0, 3: 1.0, 5: 1.0}


def generate_steered(model, tok, cfg, r, n):
    """``n`` greedy tokens of one prompt under ``steer(model, cfg, r)``, with the logits of every step."""
    gen_cfg = SteeredModel(model, tok, cfg).generation_config(n, min_new_tokens=n, output_logits=True,
                                                              return_dict_in_generate=True)
    ids = torch.tensor([r.input_ids])
    with steer(model, cfg, r), torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_cache_generation_equals_full_recompute(models, tok, impl):
    model, r = models[impl], rendered(tok, 1)
    cfg = SteeringConfig(alpha=0.4)
    out = generate_steered(model, tok, cfg, r, 6)
    seq = out.sequences[0].tolist()
    p = len(r.input_ids)
    assert len(seq) == p + 6
    for step, step_logits in enumerate(out.logits):
        with steer(model, cfg, r):  # emphasis stays the prompt's: generated keys are never down-weighted
            full = logits(model, seq[: p + step])[0, -1]
        torch.testing.assert_close(step_logits[0], full, atol=1e-5, rtol=0)
    # and the whole sequence equals the brute-force reference (generated keys at full weight)
    with steer(model, cfg, r):
        full = logits(model, seq)
    ref = reference_logits(models["eager"], seq, user_mask(r), 0.4)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)


def test_decode_bias_buffer_is_reused_and_rebuilt_exactly(models, tok, monkeypatch):
    """Decoding steps take their bias from a per-layer buffer built ahead of the cache: with 2 keys of
    slack it is rebuilt every third step, and every step still equals full recompute."""
    from ctxaware.attention import plan as AP

    monkeypatch.setattr(AP, "DECODE_SLACK", 2)
    builds = []
    real = AP.KeyBiasPlan.decode_bias

    def spy(self, layer, kv_length, *args):
        key = ("decode", layer, *args[:3])
        buf = self._cache.get(key)
        builds.append(buf is None or buf.shape[-1] < kv_length)
        return real(self, layer, kv_length, *args)

    monkeypatch.setattr(AP.KeyBiasPlan, "decode_bias", spy)
    model, r = models["sdpa"], rendered(tok, 1)
    cfg = SteeringConfig(alpha=0.3)
    out = generate_steered(model, tok, cfg, r, 7)
    layers = model.config.num_hidden_layers
    assert len(builds) == 6 * layers  # 6 decoding steps after the prefill
    assert sum(builds) == 2 * layers  # built at the first step and again 3 steps later
    seq, p = out.sequences[0].tolist(), len(r.input_ids)
    for step, step_logits in enumerate(out.logits):
        with steer(model, cfg, r):
            full = logits(model, seq[: p + step])[0, -1]
        torch.testing.assert_close(step_logits[0], full, atol=1e-5, rtol=0)


def test_generated_keys_are_never_down_weighted(models, tok):
    model, r = models["sdpa"], rendered(tok)
    p = len(r.input_ids)
    seq = r.input_ids + [7, 50, 99, 120, 33]
    with steer(model, SteeringConfig(alpha=0.2), r):
        steered = logits(model, seq)
    right = reference_logits(models["eager"], seq, user_mask(r), 0.2)
    wrong = reference_logits(models["eager"], seq, user_mask(r), 0.2, down_generated=True)
    torch.testing.assert_close(steered, right, atol=1e-5, rtol=0)
    assert (steered[0, p:] - wrong[0, p:]).abs().max() > 1e-3
    torch.testing.assert_close(steered[0, :p], wrong[0, :p], atol=1e-5, rtol=0)  # causal: prompt unaffected


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causality_later_tokens_do_not_change_earlier_logits(models, tok, impl):
    model, r = models[impl], rendered(tok)
    p = len(r.input_ids)
    cut = r.spans_of("user")[0].start + 3
    emph = user_mask(r)
    changed = list(r.input_ids)
    for i in range(cut, p):
        changed[i] = (changed[i] * 7 + 11) % VOCAB
    changed_emph = emph.clone()
    changed_emph[0, cut:] = ~changed_emph[0, cut:]  # later emphasis changes too
    cfg = SteeringConfig(alpha=0.3)
    with steer(model, cfg, emph):
        a = logits(model, r.input_ids)
    with steer(model, cfg, changed_emph):
        b = logits(model, changed)
    torch.testing.assert_close(a[0, :cut], b[0, :cut], atol=1e-6, rtol=0)
    assert (a[0, cut:] - b[0, cut:]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padded_batch_equals_one_by_one(models, tok, impl):
    model = models[impl]
    chats = [rendered(tok, i) for i in range(3)]
    assert len({len(c) for c in chats}) == 3
    cfg = SteeringConfig(alpha=0.3)
    width = max(len(c) for c in chats)
    ids = torch.tensor([[0] * (width - len(c)) + c.input_ids for c in chats])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chats])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with steer(model, cfg, chats):
        batch = logits(model, ids, attention_mask=mask, position_ids=pos)
    for i, c in enumerate(chats):
        with steer(model, cfg, c):
            single = logits(model, c.input_ids)
        torch.testing.assert_close(batch[i, width - len(c):], single[0], atol=1e-5, rtol=0)
    # generation: batch of replies equals replies one by one, and equals reference-free recompute
    sm = SteeredModel(model, tok, cfg)
    gen_cfg = sm.generation_config(5, min_new_tokens=5, output_logits=True, return_dict_in_generate=True)
    with steer(model, cfg, chats), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    for i, c in enumerate(chats):
        one = torch.tensor([c.input_ids])
        with steer(model, cfg, c), torch.no_grad():
            single = model.generate(input_ids=one, generation_config=gen_cfg)
        assert out.sequences[i, width:].tolist() == single.sequences[0, len(c):].tolist()
        for step in range(5):
            torch.testing.assert_close(out.logits[step][i], single.logits[step][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decode_bias_mask_with_padding_in_every_dtype(dtype):
    """The padded decode mask of a float64 model once overflowed (float64's min put into float32)."""
    from ctxaware.attention import functional as AF

    bias = torch.tensor([[0.0, -1.5, 0.0, 0.0], [-1.5, 0.0, 0.0, 0.0]])
    pad = torch.tensor([[True, True, True, True], [False, True, True, True]])[:, None, None, :]
    mask = AF.bias_mask(bias, torch.tensor([1.0, 0.0]), pad, dtype)
    assert mask.dtype == dtype and mask.shape == (2, 2, 1, 4)
    assert mask[1, 0, 0, 0] == torch.finfo(dtype).min and mask[1, 1, 0, 0] == torch.finfo(dtype).min
    assert mask[0, 0, 0, 1].item() == pytest.approx(-1.5, rel=1e-2) and mask[0, 1, 0, 1] == 0
    q, k, v = (torch.randn(2, 2, 1, 8, dtype=dtype), torch.randn(2, 1, 4, 8, dtype=dtype),
               torch.randn(2, 1, 4, 8, dtype=dtype))
    out = AF.sdpa_decode_key_bias(q, k, v, pad, scaling=8 ** -0.5, bias=bias, head_scale=torch.tensor([1.0, 0.0]))
    assert torch.isfinite(out).all()


def test_steered_model_batch_equals_single_and_steering_changes_replies(models, tok):
    model = models["sdpa"]
    sm = SteeredModel(model, tok, SteeringConfig(alpha=0.05))
    batch = sm.chat_batch(CONVERSATIONS, max_new_tokens=6, min_new_tokens=6)
    single = [sm.chat(c, max_new_tokens=6, min_new_tokens=6) for c in CONVERSATIONS]
    assert batch == single
    assert sm.chat_batch(CONVERSATIONS, max_new_tokens=6, min_new_tokens=6, batch_size=2) == batch
    plain = SteeredModel(model, tok, None).chat_batch(CONVERSATIONS, max_new_tokens=6, min_new_tokens=6)
    assert SteeredModel(model, tok, SteeringConfig(alpha=1.0)).chat_batch(
        CONVERSATIONS, max_new_tokens=6, min_new_tokens=6) == plain
    assert plain != batch  # alpha=0.05 on a sharp random model changes some reply


def test_steered_model_is_greedy_whatever_the_generation_config(tok):
    model = tiny_model("llama", "sdpa", seed=1)
    r = rendered(tok)
    sm = SteeredModel(model, tok, SteeringConfig(alpha=0.5))
    expected = list(r.input_ids)
    with steer(model, sm.config, r):  # greedy by hand: argmax of the steered logits, full recompute
        for _ in range(5):
            expected.append(int(logits(model, expected)[0, -1].argmax()))
    model.generation_config.do_sample = True
    model.generation_config.temperature = 5.0
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 3.0
    torch.manual_seed(123)
    reply = sm.generate_rendered([r], max_new_tokens=5, eos_token_id=[VOCAB + 1])  # no eos: 5 tokens
    assert reply == [tok.decode(expected[len(r.input_ids):], skip_special_tokens=True).strip()]


def test_generate_rendered_stops_at_eos_and_stop_strings(tok):
    model = tiny_model("llama", "sdpa", seed=2)
    r = rendered(tok)
    sm = SteeredModel(model, tok, SteeringConfig(alpha=0.5))
    never = [VOCAB + 1]  # an eos id the model cannot produce: exactly max_new_tokens tokens
    with steer(model, sm.config, r), torch.no_grad():
        seq = model.generate(input_ids=torch.tensor([r.input_ids]), generation_config=sm.generation_config(8, never))
    new = seq[0, len(r.input_ids):].tolist()
    full = sm.generate_rendered([r], max_new_tokens=8, eos_token_id=never)[0]
    assert full == tok.decode(new, skip_special_tokens=True).strip()
    # a token the model produces acts as eos: the reply is what came before its first occurrence
    eos = new[4]
    cut = sm.generate_rendered([r], max_new_tokens=8, eos_token_id=eos)[0]
    assert cut == tok.decode(new[: new.index(eos)], skip_special_tokens=True).strip()
    # a stop string: the reply is cut just before it
    stop = next(c for c in full[1:] if c.isascii() and c.isalnum())
    stopped = sm.generate_rendered([r], max_new_tokens=8, eos_token_id=never, stop_strings=[stop])[0]
    assert stopped == full[: full.index(stop)].strip()


# ----------------------------------------------------------------------------- state and errors
def test_model_restored_after_context_and_after_exception(models, tok):
    for impl, model in models.items():
        r = rendered(tok)
        params, impls = state_snapshot(model)
        before = logits(model, r.input_ids)
        with steer(model, SteeringConfig(alpha=0.5), r):
            assert model.config._attn_implementation == f"ctxaware_{impl}"
            assert all(m.config._attn_implementation == f"ctxaware_{impl}" for m in model.modules()
                       if hasattr(m, "config"))
            assert backend.active_plans() > 0
        with pytest.raises(KeyError):
            with steer(model, SteeringConfig(alpha=0.5), r):
                logits(model, r.input_ids)
                raise KeyError("boom")
        with pytest.raises(SteeringError, match="batch"):  # 2 emphasis rows, a batch of 3 inside the block
            with steer(model, SteeringConfig(alpha=0.5), [r, r]):
                logits(model, torch.tensor([r.input_ids] * 3))
        params2, impls2 = state_snapshot(model)
        assert impls2 == impls and model.config._attn_implementation == impl
        assert all(torch.equal(params[k], params2[k]) for k in params) and params.keys() == params2.keys()
        assert backend.active_plans() == 0
        assert torch.equal(logits(model, r.input_ids), before)


def test_nested_contexts_innermost_wins_and_unwind(models, tok):
    model, r = models["sdpa"], rendered(tok)
    with steer(model, SteeringConfig(alpha=0.3), r):
        outer = logits(model, r.input_ids)
        with steer(model, SteeringConfig(alpha=0.6), r):
            inner = logits(model, r.input_ids)
        again = logits(model, r.input_ids)
    with steer(model, SteeringConfig(alpha=0.6), r):
        direct = logits(model, r.input_ids)
    torch.testing.assert_close(inner, direct, atol=0, rtol=0)
    torch.testing.assert_close(outer, again, atol=0, rtol=0)
    assert model.config._attn_implementation == "sdpa" and backend.active_plans() == 0


@pytest.mark.parametrize("spec", ["", "3:", "a-b", "5-2", "0;;1", "-1", "1:x", "0,,2"])
def test_heads_spec_syntax_errors(spec):
    with pytest.raises(ConfigError):
        SteeringConfig(heads=spec)


def test_heads_spec_parsing_and_range_checks(models, tok):
    assert SteeringConfig(heads="0-1").resolve_heads(3, 4) == {0: None, 1: None}
    assert SteeringConfig(heads="2:0,3;0:all").resolve_heads(3, 4) == {0: None, 2: [0, 3]}
    assert SteeringConfig(heads="all:1-2").resolve_heads(2, 4) == {0: [1, 2], 1: [1, 2]}
    assert SteeringConfig(heads={"1": [0, 1, 2, 3]}).resolve_heads(3, 4) == {1: None}
    assert SteeringConfig(heads=[2, 0]).resolve_heads(3, 4) == {0: None, 2: None}
    model, r = models["sdpa"], rendered(tok)
    for bad, what in [("3", "layer 3"), ("0:4", "head 4"), ({5: None}, "layer 5")]:
        with pytest.raises(ConfigError, match=what):
            with steer(model, SteeringConfig(heads=bad), r):
                pass  # pragma: no cover
        with pytest.raises(ConfigError, match=what):
            SteeredModel(model, tok, SteeringConfig(heads=bad))
    assert model.config._attn_implementation == "sdpa" and backend.active_plans() == 0


def test_config_validation_and_round_trip(tmp_path):
    for alpha in (0, -0.1, 1.5, float("nan"), "x", True):
        with pytest.raises(ConfigError):
            SteeringConfig(alpha=alpha)
    with pytest.raises(ConfigError):
        SteeringConfig(compounding="layerwise")
    with pytest.raises(ConfigError):
        SteeringConfig(emphasis="tool")
    cfg = SteeringConfig(alpha=0.8, heads="3:0,5;7:all", emphasis="system+user", compounding="reference")
    path = tmp_path / "steer.yaml"
    path.write_text(cfg.to_yaml())
    assert SteeringConfig.from_file(path) == cfg


def test_emphasis_roles_and_errors(tok):
    two_users = render(tok, CONVERSATIONS[1], add_generation_prompt=True)
    users = two_users.spans_of("user")
    every = emphasis_mask(two_users, ("user",))[0]
    last = emphasis_mask(two_users, ("last_user",))[0]
    assert every.sum() == sum(len(s) for s in users) and last.sum() == len(users[-1])
    assert last[users[-1].start:users[-1].end].all() and not last[users[0].start:users[0].end].any()
    with_system = render(tok, CONVERSATIONS[0], add_generation_prompt=True)
    both = emphasis_mask(with_system, ("system", "user"))[0]
    assert both.sum() == sum(len(s) for s in with_system.spans)
    batch = emphasis_mask([with_system, two_users], ("user",))  # right-aligned, left-padded
    width = max(len(with_system), len(two_users))
    assert batch.shape == (2, width)
    assert torch.equal(batch[1, width - len(two_users):], every)
    no_user = render(tok, [{"role": "system", "content": "Hi"}, {"role": "assistant", "content": "Yes"}])
    with pytest.raises(SteeringError, match="emphasise no token"):
        emphasis_mask(no_user, ("user",))
    with pytest.raises(SteeringError):
        emphasis_mask(torch.ones(1, 4), ("user",))  # not boolean


@pytest.mark.parametrize("emphasis", ["last_user", "system+user"])
def test_other_emphasis_equals_brute_force(models, tok, emphasis):
    r = rendered(tok, 1 if emphasis == "last_user" else 0)
    cfg = SteeringConfig(alpha=0.3, emphasis=emphasis)
    with steer(models["sdpa"], cfg, r):
        out = logits(models["sdpa"], r.input_ids)
    ref = reference_logits(models["eager"], r.input_ids, emphasis_mask(r, cfg.emphasis_roles), 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sliding_window_layers_keep_keys_aligned_during_decoding(impl):
    """Past the window the cache keeps only the last keys; the bias must follow their positions."""
    model = tiny_model("qwen2", impl, layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.randint(5, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    emph = torch.zeros(1, 12, dtype=torch.bool)
    emph[0, 6:9] = True
    cfg = SteeringConfig(alpha=0.3)
    gen_cfg = SteeredModel(model, tiny_tokenizer(), cfg).generation_config(
        6, min_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    with steer(model, cfg, emph), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
        full = logits(model, out.sequences)
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[0, 11 + step], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- CLI
def test_cli_chat_parses_steering_options():
    from ctxaware.cli.main import build_parser
    from ctxaware.cli.options import config_from_args

    args = build_parser().parse_args(["chat", "Hi", "--alpha", "0.9", "--heads", "0-11"])
    cfg = config_from_args(SteeringConfig, args)
    assert cfg == SteeringConfig(alpha=0.9, heads="0-11")
    assert cfg.resolve_heads(30, 9) == {i: None for i in range(12)}
    help_text = build_parser()._subparsers._group_actions[0].choices["chat"].format_help()
    assert "--heads" in help_text and "3:0,5;7:all" in help_text


@pytest.mark.parametrize("argv,config", [
    (["--alpha", "0.3", "--heads", "0-1"], SteeringConfig(alpha=0.3, heads="0-1")),
    (["--heads", "1:0,3;2"], SteeringConfig(heads="1:0,3;2")),  # any steering option turns it on
    ([], None),
])
def test_cli_chat_replies_like_the_library(capsys, monkeypatch, tok, argv, config):
    import json

    from ctxaware.cli.main import main

    model = _models("llama")["sdpa"]
    monkeypatch.setattr("ctxaware.models.load_model", lambda *a, **k: (model, tok))
    seen = []

    class Spy(SteeredModel):
        def __init__(self, m, t, c=None, **kw):
            seen.append(c)
            super().__init__(m, t, c, **kw)

    monkeypatch.setattr("ctxaware.steering.SteeredModel", Spy)
    assert main(["chat", "What is the capital of France?", "--max-new-tokens", "5", "--json", *argv]) == 0
    assert seen == [config]
    reply = json.loads(capsys.readouterr().out)["reply"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert reply == SteeredModel(model, tok, config).chat(msgs, max_new_tokens=5)
    assert model.config._attn_implementation == "sdpa" and backend.active_plans() == 0


def test_cli_chat_rejects_bad_heads_in_one_line(capsys, monkeypatch):
    from ctxaware.cli.main import main

    monkeypatch.setattr("ctxaware.models.load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    assert main(["chat", "Hi", "--alpha", "0.9", "--heads", "3:"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctxaware chat: error:") and "\n" not in err


# ----------------------------------------------------------------------------- embedded model
@pytest.fixture(scope="module")
def embedded():
    from ctxaware.models import load_model

    try:
        return load_model(dtype="float32")
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"embedded model unavailable: {exc}")


DOC_CHAT = [{"role": "system", "content": "You answer from the document."},
            {"role": "user", "content": "Document: The lighthouse at Cape Verel was built in 1871 and painted red "
                                        "in 1902. Question: When was the lighthouse painted red?"}]


def test_embedded_alpha_one_and_steered_backends_equal_brute_force(embedded):
    """30 layers of float32 rounding: logits (|x| up to ~40) agree to 1e-4, probabilities to 1e-5."""
    model, tokenizer = embedded
    r = render(tokenizer, DOC_CHAT, add_generation_prompt=True)
    base = logits(model, r.input_ids)
    with steer(model, SteeringConfig(alpha=1.0), r):
        assert torch.equal(logits(model, r.input_ids), base)
    cfg = SteeringConfig(alpha=0.5, heads="0-11;20:0,4")
    with steer(model, cfg, r):
        sdpa = logits(model, r.input_ids)
    model.set_attn_implementation("eager")
    try:
        with steer(model, cfg, r):
            eager = logits(model, r.input_ids)
        ref = reference_logits(model, r.input_ids, user_mask(r), 0.5, cfg.heads)
    finally:
        model.set_attn_implementation("sdpa")
    for a, b in ((sdpa, eager), (sdpa, ref), (eager, ref)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.softmax(-1), b.softmax(-1), atol=1e-5, rtol=0)
    assert (sdpa - base).abs().max() > 1e-2
    assert model.config._attn_implementation == "sdpa" and backend.active_plans() == 0


@pytest.mark.slow
def test_embedded_batch_equals_single_and_cli(embedded, capsys, monkeypatch):
    model, tokenizer = embedded
    sm = SteeredModel(model, tokenizer, SteeringConfig(alpha=0.5))
    convs = [DOC_CHAT, [{"role": "user", "content": "Name a colour."}]]
    batch = sm.chat_batch(convs, max_new_tokens=8)
    assert batch == [sm.chat(c, max_new_tokens=8) for c in convs]
    from ctxaware.cli.main import main

    monkeypatch.setattr("ctxaware.models.load_model", lambda *a, **k: embedded)
    assert main(["chat", DOC_CHAT[1]["content"], "--system", DOC_CHAT[0]["content"], "--alpha", "0.5",
                 "--max-new-tokens", "8", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out) == {"reply": batch[0]}


# ----------------------------------------------------------------------------- target-share rule
_SHARE: dict = {}
SHARE_REF = "ctxaware_test_share_reference"


def _share_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Brute force of METHOD "Target share" in float64, from log-sum-exps of the scores."""
    n_rep = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(n_rep, 1), value.double().repeat_interleave(n_rep, 1)
    scores = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]].double()
    heads = _SHARE["heads"].get(module.layer_idx)
    if heads is not None:
        t = scores.shape[-1]
        emph = _SHARE["emphasis"]
        n = min(emph.shape[1], t)
        e_keys = torch.zeros(emph.shape[0], t, dtype=torch.bool)
        e_keys[:, :n] = emph[:, :n]
        n_keys = torch.zeros_like(e_keys)
        n_keys[:, :n] = ~emph[:, :n]
        g_keys = ~(e_keys | n_keys)
        neg = torch.tensor(float("-inf"), dtype=torch.float64)

        def lse(sel):
            return torch.where(sel[:, None, None, :], scores, neg).logsumexp(-1)

        s = _SHARE["share"]
        z_e, z_n, z_g = lse(e_keys).exp(), lse(n_keys).exp(), lse(g_keys).exp()
        num = z_e * (1 - s) / s - z_g
        b = torch.where(num > 0, torch.log(num.clamp_min(1e-300) / z_n), torch.full_like(num, -30.0))
        b = torch.where(z_n > 0, b.clamp(-30.0, 0.0), torch.zeros_like(b))
        sel = torch.zeros(scores.shape[1], dtype=torch.bool)
        sel[heads] = True
        b = torch.where(sel[None, :, None], b, torch.zeros_like(b))
        scores = scores + b[..., None] * n_keys[:, None, None, :].double()
        _SHARE.setdefault("probs", {})[module.layer_idx] = (scores.softmax(-1), e_keys)
    probs = scores.softmax(-1)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), probs.to(query.dtype)


def share_reference_logits(model, ids, emphasis, share, heads="all"):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SHARE_REF, _share_reference_attention)
    AttentionMaskInterface.register(SHARE_REF, eager_mask)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    resolved = SteeringConfig(heads=heads).resolve_heads(n_layers, n_heads)
    _SHARE.update(heads={layer: (h if h is not None else list(range(n_heads))) for layer, h in resolved.items()},
                  emphasis=torch.as_tensor(emphasis), share=share)
    saved = model.config._attn_implementation
    model.config._attn_implementation = SHARE_REF
    try:
        return logits(model, ids), _SHARE.get("probs", {})
    finally:
        model.config._attn_implementation = saved
        _SHARE.clear()


@functools.lru_cache(maxsize=None)
def _models64(kind: str):
    return {impl: tiny_model(kind, impl).to(torch.float64) for impl in ("sdpa", "eager")}


@pytest.mark.parametrize("share,heads", [(0.5, "all"), (0.8, "1:0,3;2"), (0.97, "all")])
def test_target_share_equals_float64_brute_force(tok, share, heads):
    model = _models64("llama")
    r = rendered(tok)
    cfg = SteeringConfig(rule="share", share=share, heads=heads, alpha=0.99)  # alpha is ignored under "share"
    ref, probs = share_reference_logits(model["eager"], r.input_ids, user_mask(r), share, heads)
    for impl in ("sdpa", "eager"):
        with steer(model[impl], cfg, r) as plan:
            assert plan.share is not None and plan.log_alpha.tolist() == [0.0]
            out = logits(model[impl], r.input_ids)
        # 1e-6: the unsteered layers run the model's own kernels (float32 softmax in eager)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert (ref - logits(model["sdpa"], r.input_ids)).abs().max() > 1e-3  # it steered something
    # the rule itself: every steered query gives E at least the share (exactly it where it acted)
    p, e_keys = probs[2]
    m_e = (p * e_keys[:, None, None, :].double()).sum(-1)[0]  # (H, Tq)
    first_e = int(e_keys[0].nonzero()[0])
    steered_heads = range(4) if heads == "all" else [0, 3]
    assert (m_e[list(steered_heads), first_e:] >= share - 1e-9).all()


def test_target_share_during_decoding_and_mixed_rules(tok):
    """KV-cache decoding under the share rule equals full recompute; a batch mixing rules equals its rows."""
    model = _models64("qwen2")["sdpa"]
    chats = [rendered(tok, i) for i in range(2)]
    cfg = SteeringConfig(rule="share", share=0.7)
    sm = SteeredModel(model, tok, None)
    gen_cfg = sm.generation_config(5, min_new_tokens=5, output_logits=True, return_dict_in_generate=True)
    ids = torch.tensor([chats[1].input_ids])
    with steer(model, cfg, chats[1]), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
    seq = out.sequences[0].tolist()
    p = len(chats[1])
    for step, step_logits in enumerate(out.logits):
        ref, _ = share_reference_logits(_models64("qwen2")["eager"], seq[: p + step], user_mask(chats[1]), 0.7)
        torch.testing.assert_close(step_logits[0].double(), ref[0, -1], atol=1e-5, rtol=0)  # float32 logits
    from ctxaware.steering import steer_rows

    width = max(len(c) for c in chats)
    batch_ids = torch.tensor([[0] * (width - len(c)) + c.input_ids for c in chats])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chats])
    rows = [SteeringConfig(alpha=0.3), cfg]
    with steer_rows(model, rows, chats), torch.no_grad():
        mixed = model.generate(input_ids=batch_ids, attention_mask=mask, generation_config=gen_cfg)
    for i, (c, row) in enumerate(zip(chats, rows)):
        one = torch.tensor([c.input_ids])
        with steer(model, row, c), torch.no_grad():
            single = model.generate(input_ids=one, attention_mask=torch.ones_like(one), generation_config=gen_cfg)
        assert mixed.sequences[i, width:].tolist() == single.sequences[0, len(c):].tolist()


def test_share_config_validation():
    for bad in (0, 1, 1.5, -0.1, float("nan"), "x", True):
        with pytest.raises(ConfigError, match="share"):
            SteeringConfig(rule="share", share=bad)
    with pytest.raises(ConfigError, match="rule"):
        SteeringConfig(rule="spotlight")
    assert SteeringConfig(rule="share", alpha=1.0).active and not SteeringConfig(alpha=1.0).active
