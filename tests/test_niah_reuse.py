"""NIH cells are reused across runs whatever the modes, α or grid; checks that fail before any cell runs."""

from __future__ import annotations

import json

import pytest
import torch
from test_niah_runner import tiny_model
from test_niah_unit import tiny_tokenizer

from ctxaware.errors import ConfigError
from ctxaware.niah import NiahConfig, read_records, run_niah

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(len(tok)), tok


def _cfg(out, **kw) -> NiahConfig:
    base = dict(lengths="200,320", depths="0,100", max_new_tokens=4, out=str(out), progress=False)
    return NiahConfig(**{**base, **kw})


def _run(tiny, cfg):
    model, tok = tiny
    return run_niah(cfg, model=model, tokenizer=tok, model_name="t", plot=False)


def test_documented_commands_one_after_the_other_reuse_cells(tiny, tmp_path):
    # docs/niah.md: `ctxaware niah` (modes chat,chat+steer), then the same with --modes raw,chat,chat+steer
    first = _run(tiny, _cfg(tmp_path, modes="chat,chat+steer"))
    assert first.new_cells == 8
    before = {r["key"]: r for r in read_records(tmp_path)}
    second = _run(tiny, _cfg(tmp_path, modes="raw,chat,chat+steer"))
    assert second.new_cells == 4 and len(second.records) == 12
    assert {r["mode"] for r in second.records[-12:]} == {"raw", "chat", "chat+steer"}
    after = {r["key"]: r for r in read_records(tmp_path)}
    assert all(after[k] == v for k, v in before.items())  # the first run's cells are kept untouched
    assert len(read_records(tmp_path)) == 12
    # another α: only the steered cells are new; a wider grid: only the new lengths
    assert _run(tiny, _cfg(tmp_path, modes="chat,chat+steer", alpha=0.5)).new_cells == 4
    wider = _run(tiny, _cfg(tmp_path, modes="chat", lengths="200,320,400"))
    assert wider.new_cells == 2 and len(wider.records) == 6
    summary = json.loads((tmp_path / "summary.json").read_text())["modes"]
    assert list(summary) == ["chat"] and summary["chat"]["cells"] == 6  # the summary is of this run's grid


def test_other_study_refused_and_overwrite_discards_only_conflicts(tiny, tmp_path):
    _run(tiny, _cfg(tmp_path, modes="chat"))
    for change, name in (({"max_new_tokens": 5}, "decoding.max_new_tokens"), ({"needle": "pizza"}, "extra.needle.keywords"),
                         ({"reserve": 100}, "extra.reserve"), ({"batch_size": 3}, "batch.batch_size")):
        with pytest.raises(ConfigError, match=f"another configuration: {name} is"):
            _run(tiny, _cfg(tmp_path, modes="chat", **change))
    again = _run(tiny, _cfg(tmp_path, modes="chat", overwrite=True))
    assert again.new_cells == len(again.records)  # --overwrite starts afresh


def test_lengths_beyond_window_refused_or_truncated(tiny, tmp_path):
    # the tiny model's window is 1024 tokens
    with pytest.raises(ConfigError, match="exceed the model's window of 1024"):
        _run(tiny, _cfg(tmp_path / "a", modes="raw", lengths="200,5000"))
    assert not (tmp_path / "a" / "results.jsonl").exists()
    run = _run(tiny, _cfg(tmp_path / "b", modes="raw", lengths="200,5000", depths="100", truncate=True))
    assert sorted(r["length"] for r in run.records) == [200, 1024]
    assert all(r["tokens"] <= 1024 for r in run.records)


def test_bad_heads_refused_before_any_cell(tiny, tmp_path):
    with pytest.raises(ConfigError):
        _run(tiny, _cfg(tmp_path, modes="raw,chat+steer", heads="40"))
    assert not (tmp_path / "results.jsonl").exists() or not read_records(tmp_path)


def test_steering_file_sets_alpha_and_heads(tiny, tmp_path):
    from ctxaware.steering import SteeringConfig
    from ctxaware.steering.file import write_steering_file

    path = write_steering_file(tmp_path / "steering.yaml", SteeringConfig(alpha=0.7, heads="1"))
    run = _run(tiny, _cfg(tmp_path / "o", modes="chat+steer", steering=str(path)))
    assert {(r["alpha"], r["heads"]) for r in run.records} == {(0.7, "1")}
    assert all(r["steering"] == {"rule": "alpha", "alpha": 0.7, "heads": "1", "emphasis": "user",
                                 "compounding": "none"} for r in run.records)
