"""The family matrix: every model family the paper or its users need, through every capability.

Shaped like peft's ``tests/test_decoder_models.py``: ONE list of tiny model configs (:data:`FAMILIES`,
real architecture classes built from a config, random weights) and ONE set of checks parametrised
over it, so adding a family is one line. Per family: load (``save_pretrained`` + ``load_model``),
role spans with the family's real chat template, ``steer()`` equal to an independent float64
brute force (softcapping and sliding windows included), ``measure_attention`` equal to eager
``output_attentions``, one NIH cell, one training step, one lm-eval request. A family outside
transformers' attention registry must be refused with one line. ``scripts/family_matrix.py`` runs
these checks and writes ``docs/families.md``; ``tests/test_families_cli.py`` runs families through
the CLI (Gemma-2, the model options of every command, the committed table).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from test_measure_models import one_thread  # noqa: F401  (autouse: one torch thread)
from test_chat import NO_SYSTEM, SPECIALS, TEMPLATES

from ctxaware.errors import CtxawareError


@dataclasses.dataclass(frozen=True)
class Family:
    """One tiny model of a family: its config class, the options that make it that family, its template."""

    name: str
    config: str  # transformers config class
    options: tuple[tuple[str, Any], ...] = ()
    template: str = "chatml_qwen"
    model_class: str | None = None  # default: AutoModelForCausalLM from the config
    lora_targets: str = "q_proj,v_proj"
    registry: bool = True  # attention through transformers' registry (False: must be refused)
    attn: str | None = None  # attention implementation to load with (default: the model's own)


def _o(**kw) -> tuple[tuple[str, Any], ...]:
    return tuple(kw.items())


_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

FAMILIES: list[Family] = [
    Family("Llama-2", "LlamaConfig", template="llama2"),
    Family("Llama-3.1", "LlamaConfig", _o(rope_parameters=_LLAMA3_ROPE), template="llama3"),
    Family("Llama-3.1 (flex_attention)", "LlamaConfig", _o(rope_parameters=_LLAMA3_ROPE), template="llama3",
           attn="flex_attention"),
    Family("Mistral-v0.2", "MistralConfig", _o(sliding_window=None), template="mistral"),
    Family("Mistral-v0.3 (sliding window)", "MistralConfig", _o(sliding_window=24), template="mistral"),
    Family("Gemma-2", "Gemma2Config", _o(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=20.0,
                                         final_logit_softcapping=30.0, sliding_window=24), template="gemma"),
    Family("Gemma-3", "Gemma3TextConfig", _o(head_dim=256, num_key_value_heads=1, query_pre_attn_scalar=256,
                                             sliding_window=24, layer_types=["sliding_attention",
                                                                             "full_attention"]),
           template="gemma", model_class="Gemma3ForCausalLM"),
    Family("TinyLlama", "LlamaConfig", _o(num_key_value_heads=1), template="zephyr"),
    Family("Qwen2.5", "Qwen2Config", template="chatml_qwen"),
    Family("Qwen3 (q/k norm)", "Qwen3Config", _o(head_dim=16), template="chatml_qwen"),
    Family("Phi-3", "Phi3Config", template="phi3", lora_targets="qkv_proj"),
    Family("Bloom (outside the registry)", "BloomConfig", _o(n_layer=2, n_head=4), template="chatml_qwen",
           lora_targets="query_key_value", registry=False),
]
IDS = [f.name for f in FAMILIES]
VOCAB = 300
MESSAGES = [{"role": "system", "content": "Answer from the text."},
            {"role": "user", "content": "The key is 4127. What is the key?"},
            {"role": "assistant", "content": "The key is 4127."},
            {"role": "user", "content": "And twice the key?"}]


def messages_for(family: Family) -> list[dict]:
    return MESSAGES[1:] if family.template in NO_SYSTEM else MESSAGES


@functools.lru_cache(maxsize=None)
def tokenizer_for(template: str):
    """A byte-level tokenizer (one token per byte, the markers as special tokens) with ``template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    fast.chat_template = TEMPLATES[template]
    return fast


def build_model(family: Family, seed: int = 0):
    """The family's tiny random model, float32, eval mode, with its attention implementation (default: the
    model's own)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=False)
    cfg = getattr(transformers, family.config)(**{**common, **dict(family.options)})
    if family.model_class:
        model = getattr(transformers, family.model_class)(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # sharper attention than the default init, so masses are far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    if family.attn:
        model.set_attn_implementation(family.attn)
    return model.float().eval()


@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.slow) if f.attn == "flex_attention" else f
                                        for f in FAMILIES], ids=IDS)
def family(request) -> Family:  # flex_attention compiles kernels for each new shape (minutes on CPU): slow
    return request.param


@pytest.fixture(scope="module")
def built(family):
    return build_model(family), tokenizer_for(family.template)


def _rendered(family: Family, tok, **kw):
    from ctxaware.chat import render

    return render(tok, messages_for(family), add_generation_prompt=True, **kw)


def _skip_outside_registry(family: Family) -> None:
    if not family.registry:
        pytest.skip("outside the attention registry: refused (test_outside_registry_is_refused)")


# ----------------------------------------------------------------------------- brute force
_REF: dict[str, Any] = {}
REF_NAME = "ctxaware_families_reference"


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         **kwargs):
    """Float64 eager attention with the steering reweighting done by hand on the probabilities:
    ``p'(j) ∝ p(j) · α`` on non-emphasised prompt keys (= a ``log α`` bias on the logits)."""
    rep = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(rep, 1), value.double().repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]].double()
    probs = scores.softmax(-1)
    alpha = _REF.get("alpha")
    if alpha is not None:
        emph = _REF["emphasis"]  # (P,) bool over the prompt
        down = torch.zeros(probs.shape[-1], dtype=torch.bool)
        n = min(len(emph), len(down))
        down[:n] = ~emph[:n]
        probs = probs * torch.where(down, torch.tensor(alpha, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        probs = probs / probs.sum(-1, keepdim=True)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), probs.to(query.dtype)


def reference_logits(model, ids: torch.Tensor, emphasis: torch.Tensor | None, alpha: float | None):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REF_NAME, _reference_attention)
    AttentionMaskInterface.register(REF_NAME, eager_mask)
    saved = model.config._attn_implementation
    _REF.update(alpha=alpha, emphasis=emphasis)
    model.config._attn_implementation = REF_NAME
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        model.config._attn_implementation = saved
        _REF.clear()


# ----------------------------------------------------------------------------- the checks
def check_load(family: Family, model, tok, tmp_path) -> None:
    from ctxaware.models import load_model

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert type(loaded.model).__name__ == type(model).__name__
    assert loaded.tokenizer.chat_template == tok.chat_template
    ids = torch.tensor([tok.encode("The tide comes in twice a day.")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    eager = load_model(str(tmp_path), dtype="float32", attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"


def check_spans(family: Family, tok) -> None:
    r = _rendered(family, tok)
    msgs = messages_for(family)
    assert [s.role for s in r.spans] == [m["role"] for m in msgs]
    for span, msg in zip(r.spans, msgs):
        assert tok.decode(r.input_ids[span.start:span.end]).strip() == msg["content"].strip()
        assert all(role == span.role for role in r.roles[span.start:span.end])
    assert r.roles[-1] == "template"  # the generation prompt


def check_steer(family: Family, model, tok) -> None:
    from ctxaware.steering import SteeringConfig, emphasis_mask, steer

    flex = family.attn == "flex_attention"  # flex takes no float64 on CPU: compared in float32, to 1e-5
    m = copy.deepcopy(model) if flex else copy.deepcopy(model).double()
    r = _rendered(family, tok)
    ids = torch.tensor([r.input_ids])
    emph = emphasis_mask(r, ("user",))[0]
    for alpha in (1.0, 0.3):
        with steer(m, SteeringConfig(alpha=alpha), r), torch.no_grad():
            got = m(input_ids=ids).logits
        want = reference_logits(m, ids, emph, alpha)
        # 1e-6: some eager files (Gemma) take the softmax in float32 even for a float64 model
        torch.testing.assert_close(got, want, atol=1e-5 if flex else 1e-6, rtol=0)
    unsteered = reference_logits(m, ids, None, None)
    assert (got - unsteered).abs().max() > 1e-4  # steering changes the logits: never a no-op


def check_measure(family: Family, model, tok) -> None:
    from ctxaware.chat.types import ROLES
    from ctxaware.measure import measure_attention

    r = _rendered(family, tok)
    res = measure_attention(model, r, queries="last")
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        att = eager(input_ids=torch.tensor([r.input_ids]), output_attentions=True).attentions
    u = torch.zeros(len(r.input_ids), len(ROLES))
    for i, role in enumerate(r.roles):
        u[i, ROLES.index(role)] = 1.0
    want = torch.stack([att[x][0, :, -1:, :].float().matmul(u).mean(1) for x in res.layers])
    assert res.channels == list(ROLES)
    torch.testing.assert_close(res.mass, want, atol=2e-5, rtol=0)
    assert res.mass.shape[0] == model.config.num_hidden_layers  # every layer, the last one included


def check_niah(family: Family, model, tok, tmp_path) -> None:
    from ctxaware.niah import NiahConfig
    from ctxaware.niah.runner import run_niah

    cfg = NiahConfig(lengths="240", depths="50", modes="chat+steer", max_new_tokens=3, out=str(tmp_path),
                     progress=False, reserve=100, system_message=family.template not in NO_SYSTEM)
    run = run_niah(cfg, model=model, tokenizer=tok, model_name=family.name, plot=False)
    assert len(run.records) == 1
    record = run.records[0]
    assert record["model"] == family.name and record["mode"] == "chat+steer" and 0.0 <= record["recall"] <= 1.0
    assert record["alpha"] < 1.0 and record["tokens"] > record["haystack_tokens"] > 0


class NotApplicable(Exception):
    """A capability the family cannot have on this hardware (a test skip, ``n/a`` in the table)."""


def check_train(family: Family, model, tok, tmp_path) -> None:
    from ctxaware.training import TrainConfig, build_trainer

    if family.attn == "flex_attention" and next(model.parameters()).device.type == "cpu":
        raise NotApplicable(f"FlexAttention has no backward on CPU (torch {torch.__version__.split('+')[0]})")

    config = TrainConfig(output_dir=str(tmp_path / "out"), cpu=True, progress=False, max_length=96,
                         learning_rate=1e-2, per_device_train_batch_size=2, logging_steps=1, save_steps=1000,
                         warmup_ratio=0.0, max_steps=1, lora_r=2, lora_alpha=4, lora_dropout=0.0,
                         lora_target_modules=family.lora_targets, sft={"optim": "adamw_torch"})
    from ctxaware.training.conditions import INDICATOR

    conv = [dict(m) for m in MESSAGES[1:3]]  # user + assistant (Mistral moves a system prompt to the last user turn)
    marked = [dict(m, content=m["content"] + f" {INDICATOR}") if m["role"] == "user" else m for m in conv]
    setup = build_trainer(config, model=copy.deepcopy(model), tokenizer=copy.deepcopy(tok),
                          conversations=[marked, conv])
    trainable = {n: p.detach().clone() for n, p in setup.trainer.model.named_parameters() if p.requires_grad}
    assert trainable
    setup.trainer.train()
    losses = [h["loss"] for h in setup.trainer.state.log_history if "loss" in h]
    assert len(losses) == 1 and losses[0] == losses[0]  # one finite step
    after = dict(setup.trainer.model.named_parameters())
    assert any(not torch.equal(before, after[n].detach()) for n, before in trainable.items())


def check_lm_eval(family: Family, model, tok) -> None:
    from lm_eval.api.instance import Instance

    from ctxaware.harness.model import CtxawareLM

    lm = CtxawareLM(pretrained=model, tokenizer=tok, device="cpu", chat_template=False)
    context, continuation = "The key is 4127. The key is", " 4127"
    (ll, _greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0, ("t", 0, 1))])
    ctx, cont = tok.encode(context), tok.encode(continuation)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert abs(ll - want) < 1e-3


# ----------------------------------------------------------------------------- parametrised tests
def test_load(family, built, tmp_path):  # unsteered: works outside the registry too
    check_load(family, *built, tmp_path)


def test_spans(family, built):
    check_spans(family, built[1])


def test_steer_equals_float64_brute_force(family, built):
    _skip_outside_registry(family)
    check_steer(family, *built)


def test_measure_equals_eager_attentions(family, built):
    _skip_outside_registry(family)
    check_measure(family, *built)


def test_one_niah_cell(family, built, tmp_path):
    _skip_outside_registry(family)
    check_niah(family, *built, tmp_path)


def test_one_training_step(family, built, tmp_path):  # unsteered: works outside the registry too
    try:
        check_train(family, *built, tmp_path)
    except NotApplicable as exc:
        pytest.skip(str(exc))


def test_one_lm_eval_request(family, built):  # unsteered: works outside the registry too
    check_lm_eval(family, *built)


def check_refused(family: Family, model, tok) -> str:
    """Steering and measurement both refuse the model with one line naming its class; returns the line."""
    from ctxaware.measure import measure_attention
    from ctxaware.steering import SteeringConfig, steer

    r = _rendered(family, tok)
    lines = []
    with pytest.raises(CtxawareError) as err:
        with steer(model, SteeringConfig(alpha=0.5), r):
            pass
    lines.append(str(err.value))
    with pytest.raises(CtxawareError) as err:
        measure_attention(model, r)
    lines.append(str(err.value))
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(CtxawareError) as err:  # a steered NIH run is refused before any cell, not run unsteered
        with tempfile.TemporaryDirectory() as d:
            check_niah(family, model, tok, Path(d))
    lines.append(str(err.value))
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())
    for line in lines:
        assert type(model).__name__ in line and "\n" not in line
    return lines[0]


@pytest.mark.parametrize("fam", [f for f in FAMILIES if not f.registry], ids=lambda f: f.name)
def test_outside_registry_is_refused(fam):
    check_refused(fam, build_model(fam), tokenizer_for(fam.template))
