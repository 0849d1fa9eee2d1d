"""Conditional SFT: assistant-only labels, the [IND] special token, LoRA/full training, resume, CLI.

Everything runs on tiny random Llama models built from a config and a byte-level BPE tokenizer
trained in memory, with several chat-template families; one slow test uses the embedded model.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from ctxaware import models  # noqa: E402
from ctxaware.chat import render  # noqa: E402
from ctxaware.errors import ConfigError, InputError  # noqa: E402
from ctxaware.training.conditions import (INDICATOR, add_indicator_token, indicator_token_id,  # noqa: E402
                                          prepare_conversations)
from ctxaware.training.config import TrainConfig, list_recipes, load_recipe, recipes_dir  # noqa: E402
from ctxaware.training.data import (IGNORE_INDEX, build_dataset, end_of_turn_ids,  # noqa: E402
                                    tokenize_conversation)
from ctxaware.training.trainer import build_trainer, save_trained, train  # noqa: E402

TEMPLATES = {
    "chatml": ("<|im_end|>", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "zephyr": ("</s>", "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
               "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    "llama3": ("<|eot_id|>", "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
               "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "llama2": ("</s>", "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }}"
               " [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% else %}"
               "<<SYS>>{{ m['content'] }}<</SYS>>{% endif %}{% endfor %}"),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is.",
          "Read the passage and answer the question. The passage: cats sleep a lot.", "[INST] <<SYS>>",
          "Hello! How can I help you today?", "system user assistant", "0123456789 ,.;:!?'\"()[]{}<>|"]

CHATS = [
    [{"role": "system", "content": "Answer from the passage."},
     {"role": "user", "content": "The passage: cats sleep a lot. What do cats do? [IND]"},
     {"role": "assistant", "content": "Cats sleep a lot."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Read the passage: the fox jumps. Who jumps? [IND]"},
     {"role": "assistant", "content": "The fox jumps over the lazy dog."}],
]


def make_tokenizer(template: str = "chatml"):
    """A fresh ~300-token byte-level BPE tokenizer with special tokens and the named chat template."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    eos, chat_template = TEMPLATES[template]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                   extra_special_tokens=[t for t in SPECIALS if t not in ("<pad>", "<s>", eos)])
    fast.chat_template = chat_template
    return fast


def make_model(vocab: int, *, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


@pytest.fixture()
def model_dir(tmp_path):
    """A tiny model + tokenizer saved to disk, loadable by ``ctxaware.models.load_model``."""
    tok = make_tokenizer("chatml")
    path = tmp_path / "base"
    make_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _fast(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "out"), cpu=True, progress=False, max_length=128, learning_rate=1e-2,
                per_device_train_batch_size=2, logging_steps=1, save_steps=1000, warmup_ratio=0.0,
                lr_scheduler_type="constant", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                lora_target_modules="q_proj,v_proj", sft={"optim": "adamw_torch"})
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_labels_supervise_only_assistant_turns_and_their_end_token(template):
    tok = make_tokenizer(template)
    eos_id = tok.convert_tokens_to_ids(TEMPLATES[template][0])
    stop = end_of_turn_ids(tok)
    for messages in CHATS:
        rendered = render(tok, messages)
        row = tokenize_conversation(tok, messages, stop_ids=stop)
        ids, labels = row["input_ids"], row["labels"]
        assert ids == rendered.input_ids and len(labels) == len(ids)
        supervised = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
        assert all(labels[i] == ids[i] for i in supervised)
        assert not any(rendered.roles[i] in ("user", "system") for i in supervised)
        content = {i for s in rendered.spans_of("assistant") for i in range(s.start, s.end)}
        assert content <= set(supervised)
        extra = [i for i in supervised if i not in content]
        assert all(rendered.roles[i] == "template" for i in extra)
        # each assistant turn closes with exactly one supervised end-of-turn token, right after its content
        n_turns = len(rendered.spans_of("assistant"))
        assert sum(ids[i] == eos_id for i in extra) == n_turns
        for s in rendered.spans_of("assistant"):
            closing = [i for i in extra if s.end <= i and all(j in supervised for j in range(s.end, i + 1))]
            assert closing and ids[max(closing)] == eos_id
        text = tok.decode([ids[i] for i in supervised])
        assert all(m["content"] in text for m in messages if m["role"] == "assistant")
        full = tokenize_conversation(tok, messages, loss="full")
        assert full["labels"] == full["input_ids"]


@pytest.mark.parametrize("tied", [True, False])
def test_indicator_is_one_special_token_initialised_at_the_mean(tied):
    tok = make_tokenizer("chatml")
    model = make_model(len(tok), tied=tied)
    n, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    tid = add_indicator_token(model, tok)
    assert len(tok) == n + 1 and INDICATOR in tok.all_special_tokens
    ids = tok.encode("What do cats do? [IND]", add_special_tokens=False)
    assert ids.count(tid) == 1 and tok.decode(ids, skip_special_tokens=True).strip() == "What do cats do?"
    inp = model.get_input_embeddings().weight
    assert inp.shape[0] == rows + 1
    assert torch.allclose(inp[tid], inp[:rows].mean(dim=0), atol=1e-6)
    out = model.get_output_embeddings().weight
    assert (out.data_ptr() == inp.data_ptr()) == tied
    assert torch.allclose(out[tid], out[:rows].mean(dim=0), atol=1e-6)
    assert add_indicator_token(model, tok) == tid and len(tok) == n + 1  # idempotent
    assert model.get_input_embeddings().weight.shape[0] == rows + 1
    assert indicator_token_id(make_tokenizer("chatml")) is None


def test_vanilla_strips_indicator_and_adds_no_token(tmp_path):
    stripped = prepare_conversations(CHATS, indicator=False)
    assert not any(INDICATOR in m["content"] for c in stripped for m in c)
    assert prepare_conversations(CHATS, indicator=True) is CHATS
    tok = make_tokenizer("chatml")
    n = len(tok)
    setup = build_trainer(_fast(tmp_path, indicator=False, max_steps=1), model=make_model(n), tokenizer=tok,
                          conversations=CHATS)
    assert setup.indicator_id is None and len(tok) == n and setup.num_indicated == 2
    assert all(tok.convert_tokens_to_ids(INDICATOR) != i for row in setup.data.dataset["input_ids"] for i in row)


@pytest.mark.parametrize("tied,loss", [(True, "assistant"), (False, "full")], ids=["tied-assistant", "untied-full"])
def test_lora_trains_indicator_row_lowers_loss_and_reloads(tmp_path, tied, loss):
    tok = make_tokenizer("chatml")
    base = tmp_path / "base"
    make_model(len(tok), tied=tied).save_pretrained(base)
    tok.save_pretrained(base)
    config = _fast(tmp_path, model=str(base), max_steps=10, loss=loss)
    setup = build_trainer(config, conversations=CHATS * 4)
    tid = setup.indicator_id
    assert tid is not None and tok.convert_tokens_to_ids(INDICATOR) != tid  # the fixture tokenizer is untouched
    emb = setup.trainer.model.get_input_embeddings()
    before = emb.weight[tid].detach().clone()
    other = emb.weight[5].detach().clone()
    setup.trainer.train()
    after = emb.weight[tid].detach()
    assert not torch.allclose(before, after)
    assert torch.equal(other, emb.weight[5].detach())  # only the [IND] row of the embeddings trains
    losses = [h["loss"] for h in setup.trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    out = save_trained(setup)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    reloaded, rtok = models.load_model(out, dtype="float32")
    assert indicator_token_id(rtok) == tid and INDICATOR in rtok.all_special_tokens
    assert torch.allclose(reloaded.get_input_embeddings().weight[tid], after, atol=1e-6)
    ids = torch.tensor([render(rtok, CHATS[0]).input_ids])
    setup.trainer.model.eval()
    with torch.no_grad():
        expected = setup.trainer.model(input_ids=ids).logits
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_from_checkpoint_reaches_the_same_weights(tmp_path, model_dir, method):
    kw = dict(model=str(model_dir), method=method, max_steps=4, save_steps=2, save_total_limit=None,
              learning_rate=1e-3)
    first = train(_fast(tmp_path, **kw), conversations=CHATS * 2)
    assert first.metrics["global_step"] == 4 and first.adapter == (method == "lora")
    assert first.indicator_id is not None  # the [IND] row (a trainable token under LoRA) is resumed too
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert ckpt.is_dir()
    again = train(_fast(tmp_path, output_dir=str(tmp_path / "again"), resume_from_checkpoint=str(ckpt), **kw),
                  conversations=CHATS * 2)
    losses = {h["step"]: h["loss"] for h in first.log_history if "loss" in h}
    resumed = {h["step"]: h["loss"] for h in again.log_history if "loss" in h}
    assert sorted(resumed) == [1, 2, 3, 4] and again.metrics["global_step"] == 4
    assert resumed == pytest.approx(losses, abs=1e-5)  # steps 1-2 restored, steps 3-4 retrained identically
    assert (tmp_path / "again" / "checkpoint-4").is_dir() and not (tmp_path / "again" / "checkpoint-2").exists()
    a, _ = models.load_model(first.output_dir, dtype="float32")
    b, _ = models.load_model(again.output_dir, dtype="float32")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(_fast(tmp_path, output_dir=str(tmp_path / "empty"), resume_from_checkpoint="latest", **kw),
              conversations=CHATS)


def test_refuses_conversations_without_supervised_tokens():
    tok = make_tokenizer("chatml")
    long_prompt = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 10},
                   {"role": "assistant", "content": "Yes."}]
    no_answer = [{"role": "user", "content": "Hello!"}]
    with pytest.raises(InputError, match="no supervised token"):
        build_dataset(tok, [CHATS[1], long_prompt], max_length=32, progress=False)
    with pytest.raises(InputError, match="no supervised token"):
        build_dataset(tok, [no_answer], progress=False)
    data = build_dataset(tok, [CHATS[1], long_prompt], max_length=32, drop_unsupervised=True, progress=False)
    assert data.num_examples == 1 and data.num_dropped == 1 and data.num_truncated >= 1
    assert all(any(x != IGNORE_INDEX for x in row[1:]) for row in data.dataset["labels"])
    assert all(len(row) <= 32 for row in data.dataset["input_ids"])


def test_recipes_and_config_errors(tmp_path):
    names = list_recipes()
    assert {"smollm2-cpu", "tinyllama-full", "llama2-7b-lora", "llama3-8b-lora"} <= set(names)
    for name in names:
        cfg = load_recipe(name, dataset="d.jsonl", output_dir="o")
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert load_recipe("llama3-8b-lora").model != load_recipe("llama2-7b-lora").model
    assert {"zero3", "fsdp"} <= {p.stem for p in (recipes_dir() / "accelerate").glob("*.yaml")}
    with pytest.raises(ConfigError, match="smollm2-cpu"):
        load_recipe("smollm2")
    with pytest.raises(ConfigError, match="method"):
        TrainConfig(method="dora")
    with pytest.raises(ConfigError, match="top-level"):
        TrainConfig(sft={"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        _fast(tmp_path, sft={"optimm": "adamw_torch"}).sft_config(on_gpu=False)
    args = _fast(tmp_path).sft_config(on_gpu=False)
    assert not args.bf16 and not args.gradient_checkpointing and args.use_cpu
    with pytest.raises(ConfigError, match="CUDA"):
        build_trainer(_fast(tmp_path, method="qlora", dataset="unused.jsonl"))


def test_cli_trains_full_model_that_saves_and_reloads(tmp_path, model_dir, capsys):
    from ctxaware.cli.main import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 2), encoding="utf-8")
    out = tmp_path / "cli-out"
    rc = main(["train", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
               "--method", "full", "--max-steps", "2", "--cpu", "--no-progress", "--max-length", "128",
               "--per-device-train-batch-size", "2", "--learning-rate", "1e-3", "--sft-arg", "optim=adamw_torch",
               "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output_dir"] == str(out) and summary["adapter"] is False
    model, tok = models.load_model(str(out), dtype="float32")
    tid = indicator_token_id(tok)
    assert tid is not None and tid == summary["indicator_id"]
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert (out / "ctxaware_train.yaml").is_file()
    assert main(["train", "--recipe", "nope"]) == 2


HAS_EMBEDDED = importlib.util.find_spec(models.EMBEDDED_PACKAGE) is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason=models.EMBEDDED_INSTALL)
def test_embedded_lora_with_indicator_reloads_and_chats(tmp_path):
    config = load_recipe("smollm2-cpu", output_dir=str(tmp_path / "emb"), max_steps=2, max_length=256,
                         per_device_train_batch_size=2, progress=False, sft={"optim": "adamw_torch"})
    result = train(config, conversations=CHATS)
    assert result.adapter and result.indicator_id is not None
    model, tok = models.load_model(result.output_dir, dtype="float32")
    assert indicator_token_id(tok) == result.indicator_id and INDICATOR in tok.all_special_tokens
    rendered = render(tok, [{"role": "user", "content": "What do cats do? [IND]"}], add_generation_prompt=True)
    assert rendered.input_ids.count(result.indicator_id) == 1
    ids = torch.tensor([rendered.input_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert reply.strip() and INDICATOR not in reply


def test_refuses_indicator_training_on_data_without_ind_unless_allowed(tmp_path, model_dir, capsys):
    from ctxaware.cli.main import main
    from ctxaware.training.conditions import strip_indicator

    plain = [strip_indicator(c) for c in CHATS]
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in plain), encoding="utf-8")
    argv = ["train", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "o"),
            "--max-steps", "1", "--cpu", "--no-progress", "--max-length", "128", "--sft-arg", "optim=adamw_torch"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0 of 4 user turns carry [IND]" in err and "--allow-no-indicator" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="0 of 4 user turns"):
        build_trainer(_fast(tmp_path, max_steps=1), model=make_model(len(make_tokenizer())),
                      tokenizer=make_tokenizer(), conversations=plain)
    setup = build_trainer(_fast(tmp_path, max_steps=1, allow_no_indicator=True),
                          model=make_model(len(make_tokenizer())), tokenizer=make_tokenizer(), conversations=plain)
    assert setup.num_indicated == 0 and setup.indicator_id is None
    assert build_trainer(_fast(tmp_path, max_steps=1, indicator=False), model=make_model(len(make_tokenizer())),
                         tokenizer=make_tokenizer(), conversations=plain).num_indicated == 0
