"""A corrupt or truncated model file gets one line and exit status 2 from every command that loads a model.

Garbage ``.gguf`` files (no magic, or the magic and a cut header), a model directory whose
safetensors are truncated, and one whose ``tokenizer.json`` is cut: never a ``struct.error`` or
``SafetensorError`` traceback.
"""

from __future__ import annotations

import json

import pytest
from test_families_cli import LOADING_COMMANDS, MESSAGES
from test_measure_models import tiny_model
from test_niah_unit import tiny_tokenizer

from ctxaware.errors import ModelLoadError

COMMANDS = {**LOADING_COMMANDS, "mtbench": (["mtbench", "--data-dir", "{mt}", "--judge-base-url", "{judge}",
                                             "--out", "{tmp}/mt", "--no-progress"], "load_model")}


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    (root / "garbage.gguf").write_bytes(b"\x8f\x01zq\x00\xff\x10!")  # 8 bytes, no GGUF magic
    (root / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and a version, then nothing
    tok = tiny_tokenizer()
    good = root / "good"
    tiny_model("llama", vocab=len(tok), layers=1).save_pretrained(good)
    tok.save_pretrained(good)
    import shutil

    for name, cut in (("cut-weights", "model.safetensors"), ("cut-tokenizer", "tokenizer.json")):
        shutil.copytree(good, root / name)
        data = (root / name / cut).read_bytes()
        (root / name / cut).write_bytes(data[: len(data) // 3])
    return root


def _run(argv, capsys):
    from ctxaware.cli.main import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_loading_command_refuses_a_corrupt_gguf_in_one_line(command, bad_models, tmp_path, capsys,
                                                                    monkeypatch):
    from mtbench_judge import FakeJudge, write_data

    monkeypatch.setenv("CTXAWARE_CACHE", str(tmp_path / "cache"))
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps(MESSAGES[1:]), encoding="utf-8")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": MESSAGES[1:3]}) + "\n", encoding="utf-8")
    with FakeJudge() as judge:
        mt = write_data(tmp_path / "mt_data")
        for name in ("garbage.gguf", "truncated.gguf"):
            tmp = tmp_path / name  # a fresh output directory per model
            argv = [a.format(data=data, tmp=tmp, messages=messages, mt=mt, judge=judge.base_url)
                    for a in COMMANDS[command][0]]
            argv += ["--out", str(tmp / "out")] if command == "niah" else []
            code, err = _run(argv + ["--model", str(bad_models / name)], capsys)
            assert code == 2 and len(err.strip().splitlines()) == 1, (command, name, err)
            assert "could not read the model file" in err and name in err and "corrupt or truncated" in err, err
            assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-converted is left to reuse

@pytest.mark.parametrize("name, needle", [("cut-weights", "could not read the model file"),
                                          ("cut-tokenizer", "tokenizer")])
def test_truncated_files_of_a_model_directory(bad_models, name, needle, capsys):
    from ctxaware.models import load_model

    with pytest.raises(ModelLoadError, match=needle):
        load_model(bad_models / name, device="cpu")
    code, err = _run(["chat", "Hi", "--model", str(bad_models / name), "--max-new-tokens", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
