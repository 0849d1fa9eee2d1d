"""``ctxaware serve`` as a process: it starts from a model directory, answers the openai client, and
on SIGTERM lets an in-flight streamed reply finish before it exits with status 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from test_niah_unit import tiny_tokenizer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # each test starts a Python process that imports torch and transformers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny-serve")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_answers_and_drains_on_sigterm(model_dir, tmp_path):
    port = _free_port()
    steering = tmp_path / "steering.yaml"
    steering.write_text("alpha: 0.5\nheads: '0'\nemphasis: user\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ctxaware", "serve", "--model", str(model_dir), "--port", str(port),
                             "--steering", str(steering), "--served-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                              max_tokens=5, temperature=0)
        assert resp.model_extra["ctxaware"]["source"] == "server" and resp.usage.completion_tokens >= 1
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 200,
                "temperature": 0, "stream": True, "ctxaware": {"alpha": 1}}
        finish, pieces = None, 0
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines)
            proc.send_signal(signal.SIGTERM)
            for line in lines:
                if line == "data: [DONE]":
                    break
                choice = json.loads(line[6:])["choices"][0]
                pieces += 1
                finish = choice["finish_reason"] or finish
        assert finish in ("length", "stop") and pieces >= 1
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_bad_steering_file_in_one_line(model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha: 2\n")
    out = subprocess.run([sys.executable, "-m", "ctxaware", "serve", "--model", str(model_dir), "--steering", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "alpha" in out.stderr and len(out.stderr.strip().splitlines()) == 1
