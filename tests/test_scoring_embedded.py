"""End to end on the embedded SmolLM2-135M-Instruct (slow): scores vs brute force, the attention CLI."""

from __future__ import annotations

import json

import pytest
from test_measure_models import real_conversations
from test_scoring import CONVS, brute_force_scores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    from ctxaware.models import load_model

    try:
        model, tok = load_model(dtype="float32")
        eager, _ = load_model(attn_implementation="eager", dtype="float32")
    except Exception as exc:  # pragma: no cover - embedded model not installed
        pytest.skip(f"embedded model unavailable: {exc}")
    return model, eager, tok


def test_embedded_scores_match_brute_force(embedded):
    from ctxaware.scoring import Scorer, ScoringConfig

    model, eager, tok = embedded
    try:
        convs = real_conversations(4, seed=11)
    except pytest.skip.Exception:
        convs = []
    convs = [c for c in convs if sum(len(m["content"]) for m in c) < 2500] + CONVS
    scorer = Scorer(model, tok, ScoringConfig(batch_size=4))
    assert scorer.layer == 20  # int(30 * 15 / 22)
    rows = scorer.score_many(convs)
    for conv, row in zip(convs, rows):
        ref = brute_force_scores(eager, tok, conv, scorer.layer)
        assert len(row.scores) == len(ref)
        for a, b in zip(row.scores, ref):
            assert (a is None) == (b is None)
            if a is not None:
                assert abs(a - b) <= 1e-5 and 0 < a < 1


def test_embedded_attention_cli_compare_template(tmp_path, capsys, embedded):
    from ctxaware.cli.main import main

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([
        {"role": "system", "content": "Answer using only the document."},
        {"role": "user", "content": "Document: The harbour of Lunden froze in the winter of 1911, and the ferry "
                                    "stopped for six weeks.\n\nQuestion: When did the harbour freeze?"}]))
    assert main(["attention", "--messages", str(chat), "--compare-template", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == list(range(30))
    for cond in out["conditions"].values():
        for i in range(30):
            assert abs(sum(cond["shares"][r][i] for r in ("system", "user", "assistant", "template")) - 1) < 1e-6
    assert out["conditions"]["template"]["shares"]["user"] != out["conditions"]["no_template"]["shares"]["user"]
