"""Model families through the CLI: a tiny Gemma-2 (softcapping, sliding window, eager by default)
through ``chat`` (plain, steered, steering file, no template, template file), ``attention`` and
``score``; one-line errors for bad model options; ``--trust-remote-code`` accepted and passed on by
every command that loads a model; and the committed ``docs/families.md`` equal to what
``scripts/family_matrix.py`` generates (slow). The family list and checks live in
``tests/test_families.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_chat import TEMPLATES
from test_families import FAMILIES, MESSAGES, build_model, tokenizer_for
from test_measure_models import one_thread  # noqa: F401  (autouse: one torch thread)


# ----------------------------------------------------------------------------- Gemma-2 through the CLI
GEMMA2 = next(f for f in FAMILIES if f.name == "Gemma-2")


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """A tiny Gemma-2 (softcapping, sliding window) saved with its tokenizer and real template."""
    path = tmp_path_factory.mktemp("gemma2")
    build_model(GEMMA2).save_pretrained(path)
    tokenizer_for(GEMMA2.template).save_pretrained(path)
    return str(path)


def _cli(argv, capsys):
    from ctxaware.cli.main import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gemma2_cli_chat_plain_steered_and_without_template(gemma2_dir, tmp_path, capsys):
    import json

    from ctxaware.steering import SteeringConfig
    from ctxaware.steering.file import write_steering_file

    base = ["chat", "The key is 4127. What is the key?", "--model", gemma2_dir, "--max-new-tokens", "4", "--json",
            "--dtype", "float32"]
    replies = {}
    for name, extra in {"plain": [], "alpha": ["--alpha", "0.5"], "eager": ["--attn-implementation", "eager"],
                        "no-template": ["--no-template"]}.items():
        code, out, err = _cli(base + extra, capsys)
        assert code == 0, err
        replies[name] = json.loads(out)["reply"]
    assert replies["eager"] == replies["plain"]  # the model's own default for Gemma-2 gives the same greedy reply
    steering = write_steering_file(tmp_path / "steering.yaml", SteeringConfig(alpha=0.5), {"model": "tiny"})
    code, out, err = _cli(base + ["--steering", str(steering)], capsys)
    assert code == 0, err
    assert json.loads(out)["reply"] == replies["alpha"]
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATES["zephyr"], encoding="utf-8")
    code, out, err = _cli(base + ["--template-file", str(template)], capsys)
    assert code == 0, err


def test_gemma2_cli_attention_and_score(gemma2_dir, tmp_path, capsys):
    import json

    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps(MESSAGES[1:]), encoding="utf-8")
    code, out, err = _cli(["attention", "--messages", str(messages), "--model", gemma2_dir, "--json",
                           "--dtype", "float32", "--attn-implementation", "eager"], capsys)
    assert code == 0, err
    shares = json.loads(out)["conditions"]
    layer_shares = next(iter(shares.values()))["shares"]
    assert all(abs(sum(layer_shares[r][i] for r in layer_shares) - 1) < 1e-4 for i in range(2))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": MESSAGES[1:3]}) for _ in range(2)) + "\n", encoding="utf-8")
    code, out, err = _cli(["score", "--in", str(data), "--out", str(tmp_path / "scored.jsonl"), "--model",
                           gemma2_dir, "--no-progress", "--json", "--device", "cpu", "--dtype", "float32"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["rows"] == 2 and summary["turns_scored"] == 2


def test_bad_model_options_are_one_line_errors(gemma2_dir, capsys):
    for extra, needle in ((["--attn-implementation", "flashy"], "attn_implementation 'flashy'"),
                          (["--device-map", "{bad"], "device_map"),
                          (["--attn-implementation", "flash_attention_2"], "could not load model")):
        code, out, err = _cli(["chat", "Hi", "--model", gemma2_dir, "--max-new-tokens", "1", *extra], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


class _Loaded(Exception):
    """Raised by the fake loader once it has recorded its arguments (the command stops there)."""


LOADING_COMMANDS = {  # command line up to the model options; the loader each one calls
    "chat": (["chat", "Hi"], "load_model"),
    "niah": (["niah", "--lengths", "240", "--depths", "50", "--modes", "chat", "--no-progress"], "load_model"),
    "score": (["score", "--in", "{data}", "--out", "{tmp}/scored.jsonl", "--no-progress"], "load_model"),
    "attention": (["attention", "--messages", "{messages}"], "load_model"),
    "serve": (["serve", "--port", "0"], "load_model"),
    "spans": (["spans", "--messages", "{messages}"], "load_tokenizer"),
    "eval": (["eval", "--tasks", "ctxaware_squad_ind", "--limit", "1"], "load_model"),
    "study": (["study", "--out", "{tmp}/study", "--no-progress"], "load_model"),
    "calibrate": (["calibrate", "--out", "{tmp}/cal"], "load_model"),
}


@pytest.mark.parametrize("command", list(LOADING_COMMANDS))
def test_trust_remote_code_reaches_the_loader_of_every_command(command, tmp_path, monkeypatch, capsys):
    """``--trust-remote-code`` is accepted by every command that loads a model and reaches its loader
    (and is off without the flag); so do ``--attn-implementation`` and ``--device-map`` where the
    command loads a whole model."""
    import json

    import ctxaware.models as models

    seen: list[bool] = []
    extra: list[dict] = []

    def fake(*args, trust_remote_code=False, **kwargs):
        seen.append(trust_remote_code)
        extra.append(kwargs)
        raise _Loaded

    monkeypatch.setattr(models, LOADING_COMMANDS[command][1], fake)
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps(MESSAGES[1:]), encoding="utf-8")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": MESSAGES[1:3]}) + "\n", encoding="utf-8")
    argv = [a.format(data=data, tmp=tmp_path, messages=messages) for a in LOADING_COMMANDS[command][0]]
    argv += ["--out", str(tmp_path / "out")] if command == "niah" else []
    for flag, want in (([], False), (["--trust-remote-code"], True)):
        with pytest.raises(_Loaded):
            _cli(argv + ["--model", str(tmp_path / "no-such-model")] + flag, capsys)
        assert seen[-1] is want, (command, flag)
    if LOADING_COMMANDS[command][1] == "load_model":
        with pytest.raises(_Loaded):
            _cli(argv + ["--model", str(tmp_path / "no-such-model"), "--attn-implementation", "eager",
                         "--device-map", "sequential"], capsys)
        assert extra[-1].get("attn_implementation") == "eager", (command, extra[-1])
        assert extra[-1].get("device_map") == "sequential", (command, extra[-1])


@pytest.mark.slow
def test_committed_family_table_is_current(tmp_path):
    """docs/families.md is what scripts/family_matrix.py generates now (the date line aside)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "families.md"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "family_matrix.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("Generated by")]

    assert body(out.read_text(encoding="utf-8")) == body((root / "docs" / "families.md").read_text(encoding="utf-8"))
    assert "FAILED" not in out.read_text(encoding="utf-8")
