"""Per-row steering (``steer_rows``), refusal of models outside the registry, unreached layers, devices.

A mixed batch (rows with their own alpha, heads and emphasis, and unsteered rows) must decode
exactly what each row decodes alone: float64 tiny models, greedy ``model.generate`` on a
left-padded batch, identical tokens.
"""

from __future__ import annotations

import pytest
import torch

from ctxaware.attention import backend
from ctxaware.errors import SteeringError
from ctxaware.steering import SteeredModel, SteeringConfig, steer, steer_rows
from test_steering import CONVERSATIONS, VOCAB, one_thread, rendered, tiny_tokenizer  # noqa: F401
from test_steering import tiny_model as _tiny_model

ROW_CONFIGS = [SteeringConfig(alpha=0.2), None, SteeringConfig(alpha=0.5, heads="1:0,3;2", emphasis="last_user")]


def model64(kind: str, impl: str, dtype: torch.dtype = torch.float64):
    return _tiny_model(kind, impl).to(dtype)


def _generate(model, tok, ids, mask, n=6):
    gen_cfg = SteeredModel(model, tok, None).generation_config(n, min_new_tokens=n, output_logits=True,
                                                               return_dict_in_generate=True)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)


# transformers' own float64 eager attention turns left-padded rows into NaN (unsteered too), so eager
# runs in float32 (tokens still identical, logits to 1e-5)
@pytest.mark.parametrize("kind,impl,dtype,atol", [
    ("llama", "sdpa", torch.float64, 1e-9), ("qwen2", "sdpa", torch.float64, 1e-9),
    ("llama", "eager", torch.float32, 1e-5), ("qwen2", "eager", torch.float32, 1e-5)])
def test_mixed_batch_generation_equals_each_row_alone(kind, impl, dtype, atol):
    model, tok = model64(kind, impl, dtype), tiny_tokenizer()
    chats = [rendered(tok, i) for i in range(3)]
    width = max(len(c) for c in chats)
    ids = torch.tensor([[0] * (width - len(c)) + c.input_ids for c in chats])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chats])
    with steer_rows(model, ROW_CONFIGS, chats) as plan:
        batch = _generate(model, tok, ids, mask)
    assert plan is not None and plan.rows == 3
    assert torch.equal(plan.log_alpha[1], torch.zeros((), dtype=torch.float64))
    assert all(not hs[1].any() for hs in plan.head_scale.values())  # the None row: zero scale, zero bias
    assert torch.equal(plan.head_scale[0][2], torch.zeros(4)) and plan.head_scale[1][2].tolist() == [1, 0, 0, 1]
    singles = []
    for cfg, c in zip(ROW_CONFIGS, chats):
        one = torch.tensor([c.input_ids])
        if cfg is None:
            single = _generate(model, tok, one, torch.ones_like(one))
        else:
            with steer(model, cfg, c):
                single = _generate(model, tok, one, torch.ones_like(one))
        singles.append(single)
    for i, (c, single) in enumerate(zip(chats, singles)):
        assert batch.sequences[i, width:].tolist() == single.sequences[0, len(c):].tolist()
        for step in range(6):
            torch.testing.assert_close(batch.logits[step][i], single.logits[step][0], atol=atol, rtol=0)
    # the rows really differ from one config for all: steering row 1 too changes its logits
    with steer_rows(model, [ROW_CONFIGS[0]] * 3, chats):
        all_steered = _generate(model, tok, ids, mask)
    assert (all_steered.logits[0][1] - batch.logits[0][1]).abs().max() > 1e-3
    assert model.config._attn_implementation == impl and backend.active_plans() == 0


def test_steer_is_steer_rows_with_one_config_and_identity_rows_change_nothing():
    model, tok = model64("llama", "sdpa"), tiny_tokenizer()
    r = rendered(tok, 0)
    ids = torch.tensor([r.input_ids])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steer(model, SteeringConfig(alpha=0.3), r):
            a = model(input_ids=ids).logits
        with steer_rows(model, [SteeringConfig(alpha=0.3)], [r]):
            b = model(input_ids=ids).logits
        for rows in ([None], [SteeringConfig(alpha=1.0)]):
            with steer_rows(model, rows, [r]) as plan:
                assert plan is None and model.config._attn_implementation == "sdpa"
                assert torch.equal(model(input_ids=ids).logits, plain)
    assert torch.equal(a, b)


def test_steer_rows_errors():
    model, tok = model64("llama", "sdpa"), tiny_tokenizer()
    chats = [rendered(tok, i) for i in range(2)]
    with pytest.raises(SteeringError, match="2 prompt"):
        with steer_rows(model, [SteeringConfig(alpha=0.5, emphasis="last_user"), SteeringConfig(alpha=0.5), None],
                        chats):
            pass  # pragma: no cover
    with pytest.raises(SteeringError, match="config"):
        with steer_rows(model, [SteeringConfig(alpha=0.5)], torch.ones(2, 5, dtype=torch.bool)):
            pass  # pragma: no cover
    # an unsteered row may emphasise nothing; a steered one may not
    emph = torch.tensor([[True, False, False], [False, False, False]])
    with steer_rows(model, [SteeringConfig(alpha=0.5), None], emph) as plan:
        assert plan.rows == 2
    with pytest.raises(SteeringError, match=r"row\(s\) \[1\]"):
        with steer_rows(model, [None, SteeringConfig(alpha=0.5)], emph):
            pass  # pragma: no cover
    assert backend.active_plans() == 0


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()


def test_model_outside_the_attention_registry_is_refused_up_front():
    model = _bloom()
    assert not backend.supports_registry(model)
    ids = torch.randint(5, VOCAB, (1, 8))
    emph = torch.zeros(1, 8, dtype=torch.bool)
    emph[0, 2:5] = True
    with pytest.raises(SteeringError, match="BloomForCausalLM.*attention registry") as info:
        with steer(model, SteeringConfig(alpha=0.01), emph):
            pytest.fail("entered the block")  # pragma: no cover
    assert "\n" not in str(info.value)
    with steer(model, SteeringConfig(alpha=1.0), emph) as plan:  # the identity needs nothing from the model
        assert plan is None
    assert backend.active_plans() == 0
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_steered_layer_never_reached_fails_at_the_first_forward(impl):
    model, tok = model64("llama", impl), tiny_tokenizer()
    r = rendered(tok, 0)
    attn = model.model.layers[1].self_attn
    saved = attn.layer_idx
    attn.layer_idx = None  # the registered function can no longer tell this layer: it is never steered
    try:
        with pytest.raises(SteeringError, match=r"LlamaForCausalLM: steered layer\(s\) \[1\] never"):
            with steer(model, SteeringConfig(alpha=0.5, heads="0-1"), r), torch.no_grad():
                model(input_ids=torch.tensor([r.input_ids]), use_cache=False)
        with steer(model, SteeringConfig(alpha=0.5, heads="0;2"), r), torch.no_grad():  # reached: fine
            model(input_ids=torch.tensor([r.input_ids]), use_cache=False)
    finally:
        attn.layer_idx = saved
    assert model._forward_hooks == {} and backend.active_plans() == 0


def test_bias_and_head_scale_follow_the_query_device(monkeypatch):
    """A fake placement: every tensor the attention functions build is made on ``query.device``."""
    model, tok = model64("llama", "sdpa"), tiny_tokenizer()
    r = rendered(tok, 0)
    seen = []
    orig_down, orig_scale = backend.KeyBiasPlan.down, backend.KeyBiasPlan.scale_for

    def down(self, kv_length, batch, device, offset=0):
        seen.append(("down", device))
        return orig_down(self, kv_length, batch, device, offset)

    def scale_for(self, layer, batch, device):
        seen.append(("scale", device))
        return orig_scale(self, layer, batch, device)

    monkeypatch.setattr(backend.KeyBiasPlan, "down", down)
    monkeypatch.setattr(backend.KeyBiasPlan, "scale_for", scale_for)
    with steer(model, SteeringConfig(alpha=0.5), r) as plan, torch.no_grad():
        model(input_ids=torch.tensor([r.input_ids]))
        meta = torch.device("meta")
        assert plan.down(len(r), 1, meta).device == meta and plan.scale_for(0, 1, meta).device == meta
        assert plan.bias(len(r), 1, meta).device == meta
    assert seen and all(dev == torch.device("cpu") for _, dev in seen[:-3])
