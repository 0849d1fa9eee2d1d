"""vLLM's own OpenAI server with ctxaware's middleware and plugin: the ``ctxaware`` body field end to end.

Starts ``python -m vllm.entrypoints.openai.api_server --middleware ctxaware.vllm.server.CtxawareMiddleware``
on 127.0.0.1 in its own session (killed as a process group at the end, EngineCore included), with a
default steering file, and talks to it with the openai client (``extra_body``). Steered log-probs
are checked against ctxaware's own steered model (``steer()``, fp32) within the plain-vLLM-vs-
transformers difference measured on the same prompt. Skipped where vLLM is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None:
    if os.environ.get("CTXAWARE_REQUIRE_VLLM"):  # CI: a missing vLLM is a failure, not a skip
        raise RuntimeError("CTXAWARE_REQUIRE_VLLM is set but vLLM is not importable here")
    pytest.skip("vLLM (bash scripts/setup_vllm.sh) and openai are needed", allow_module_level=True)

import httpx  # noqa: E402

from test_vllm_plugin import A, C, hf, hf_logprobs, model_dir  # noqa: E402,F401  (shared fixtures)

START_TIMEOUT = 360


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-server")
    steering = tmp / "steer.yaml"
    steering.write_text("alpha: 0.6\nheads: all\nemphasis: user\n")
    port = _port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "CTXAWARE_VLLM_STEERING": str(steering),
           "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "1024", "--enforce-eager", "--block-size", "32",
                             "--served-model-name", "m", "--middleware", "ctxaware.vllm.server.CtxawareMiddleware"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("vLLM server did not start:\n" + (tmp / "server.log").read_text()[-4000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


def chat(url, messages, ctxaware=None, **kw):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    extra = {"return_tokens_as_token_ids": True, **({} if ctxaware is None else {"ctxaware": ctxaware})}
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, max_tokens=1,
                                          temperature=0, logprobs=True, top_logprobs=5, extra_body=extra, **kw)


def top(resp):
    """First-token top log-probs by token id (``return_tokens_as_token_ids`` gives "token_id:N")."""
    return {int(t.token.split(":")[-1]): t.logprob for t in resp.choices[0].logprobs.content[0].top_logprobs}


def test_steered_over_http_matches_ctxaware(server, hf):
    plain = chat(server, A, {"alpha": 1})
    assert plain.model_extra["ctxaware"]["steered"] is False
    ref_plain = hf_logprobs(hf, A)[0]
    tol = max(4 * max(abs(v - ref_plain[i].item()) for i, v in top(plain).items()), 1e-4)
    for body, want in [({"alpha": 0.5}, {"alpha": 0.5}), (None, {"alpha": 0.6})]:  # request, default file
        resp = chat(server, C if body is None else A, body)
        applied = resp.model_extra["ctxaware"]
        assert applied["steered"] and applied["source"] == ("server" if body is None else "request")
        assert applied["steering"]["alpha"] == want["alpha"]
        ref = hf_logprobs(hf, C if body is None else A, want)[0]
        got = top(resp)
        assert max(abs(v - ref[i].item()) for i, v in got.items()) <= tol
        base = hf_logprobs(hf, C if body is None else A)[0]
        assert max(abs(ref[i] - base[i]).item() for i in got) > 20 * tol


def test_refusals_are_400(server):
    for body, param in [({"alpha": 2}, "ctxaware.alpha"), ({"heads": "99"}, "ctxaware.heads"),
                        ({"bogus": 1}, "ctxaware.bogus"), ("yes", "ctxaware")]:
        r = httpx.post(server + "/v1/chat/completions", timeout=60,
                       json={"model": "m", "messages": A, "max_tokens": 1, "ctxaware": body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    only_system = [{"role": "system", "content": "hi"}]
    r = httpx.post(server + "/v1/chat/completions", timeout=60,
                   json={"model": "m", "messages": only_system, "max_tokens": 1, "ctxaware": {"alpha": 0.5}})
    assert r.status_code == 400 and "emphasise no token" in r.json()["error"]["message"]


def test_stream_reports_applied(server):
    with httpx.stream("POST", server + "/v1/chat/completions", timeout=120,
                      json={"model": "m", "messages": A, "max_tokens": 3, "stream": True, "temperature": 0,
                            "ctxaware": {"alpha": 0.5}}) as r:
        assert r.status_code == 200
        assert json.loads(r.headers["x-ctxaware-steering"])["steered"] is True
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["ctxaware"]["steering"]["alpha"] == 0.5
    assert any("ctxaware" in e for e in events[1:])  # the finishing event
