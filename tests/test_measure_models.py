"""Tiny random models and tiny chat tokenizers for the measurement/scoring tests (plus their checks).

Builders: ``tiny_tokenizer(template)`` (byte-level BPE trained in memory with the ``tokenizers``
library, and a ChatML, Zephyr or Llama-2 style chat template), ``tiny_model(kind)`` (Llama- or
Qwen2-style with grouped-query attention, eager attention, float32), and
``brute_force_attentions`` (eager ``output_attentions=True``: the reference of every test).
Conversations are rendered with the real :func:`ctxaware.chat.render`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ZEPHYR = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Llama-2: the system prompt is merged into the first user turn, contents are trimmed, each
# exchange is wrapped in BOS ... EOS, no generation prompt.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = none %}{% set loop_messages = messages %}"
    "{% endif %}{% for m in loop_messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system is not none %}<<SYS>>\n{{ system | trim }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] | trim }} [/INST]{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES = {"chatml": CHATML, "zephyr": ZEPHYR, "llama2": LLAMA2}
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is the capital.",
    "Read the passage below and answer the question.\nThe passage: cats sleep a lot.",
    "Hello! How can I help you today?", "system user assistant template [INST] [/INST] <<SYS>>",
    "0123456789 ,.;:!?'\"()[]{}<>", "Summarise the text in one sentence.\n\nIt was a bright cold day in April.",
]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits make the
    tests several times slower: each module importing this fixture runs on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(template: str = "chatml"):
    """A ~300-token byte-level BPE tokenizer with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    eos = "<|im_end|>" if template == "chatml" else "</s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    fast.chat_template = TEMPLATES[template]
    return fast


def tiny_model(kind: str = "llama", vocab: int = 300, layers: int = 4, seed: int = 0, positions: int = 1024):
    """A random tiny causal LM (eager attention, float32, eval mode) with GQA (4 q heads, 2 kv heads)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=positions)
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    # sharper attention than the default init, so masses are far from uniform
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model.eval()


def brute_force_attentions(model, input_ids: list[int]) -> list[torch.Tensor]:
    """Per layer ``(H, T, T)`` attention probabilities from eager ``output_attentions=True``."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([input_ids]), output_attentions=True)
    return [a[0].float() for a in out.attentions]


def real_conversations(n: int, *, seed: int = 0) -> list[list[dict]]:
    """``n`` conversations drawn (seeded) from the shared instruction data; skips the test without it."""
    import json
    import random

    path = SHARED_DATA / "instructions" / "converted" / "messages_mixed.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data not available ({path})")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if any(m["role"] == "assistant" and m["content"] for m in r["messages"])]
    multi = [r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1]
    rng = random.Random(seed)
    picked = rng.sample(multi, 2) + rng.sample(rows, n - 2)
    return [r["messages"] for r in picked]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_tiny_tokenizer_renders_chat(template):
    from ctxaware.chat import render

    tok = tiny_tokenizer(template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Paris."}]
    r = render(tok, messages)
    assert [s.role for s in r.spans] == ["system", "user", "assistant"]
    for s, m in zip(r.spans, messages):
        assert tok.decode(r.input_ids[s.start:s.end]).strip() == m["content"]
    assert tok.eos_token_id in r.input_ids[r.spans[2].end:]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_model_attention_rows_sum_to_one(kind):
    model = tiny_model(kind)
    att = brute_force_attentions(model, list(range(5, 25)))
    assert len(att) == 4
    torch.testing.assert_close(att[0].sum(-1), torch.ones(4, 20))
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA really exercised
