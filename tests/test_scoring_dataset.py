"""Dataset scoring: formats, resume after interruption (identical output), shards + merge, bad rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_measure_models import one_thread, tiny_model, tiny_tokenizer  # noqa: F401

from ctxaware.errors import ConfigError, InputError, InputFileNotFoundError
from ctxaware.scoring import ScoringConfig, load_conversations, merge_shards, read_rows, score_dataset, write_rows
from ctxaware.scoring.probe import Scorer
from ctxaware.scoring.run import parse_shard

WORDS = ["The quick brown fox.", "What is the capital of France?", "Cats sleep a lot.", "Hello!",
         "Summarise the text in one sentence.", "It was a bright cold day in April."]


def _rows(n=23):
    rows = []
    for i in range(n):
        user = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))
        rows.append({"id": i, "messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": WORDS[i % len(WORDS)]}]})
    rows[3] = {"id": 3, "conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Paris."}]}
    rows[5] = {"id": 5, "messages": [{"role": "user", "content": "Hello!"}]}
    rows[7] = {"id": 7, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    rows[9] = {"id": 9, "conversations": [{"from": "narrator", "value": "Hello!"}]}
    return rows


@pytest.fixture(scope="module")
def probe():
    return tiny_model("llama"), tiny_tokenizer("chatml")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    write_rows(_rows(), path)
    return path


def test_output_keeps_rows_and_reports_bad_ones(probe, data, tmp_path):
    model, tok = probe
    out = tmp_path / "scored.jsonl"
    summary = score_dataset(model, tok, data, out, ScoringConfig(batch_size=4), progress=False)
    rows = read_rows(out)
    assert [r["id"] for r in rows] == list(range(23))
    original = _rows()
    for r, o in zip(rows, original):
        assert {k: v for k, v in r.items() if not k.startswith("ctx_")} == o  # text never modified
    assert rows[5]["ctx_score_error"] == "no_assistant_turn" and rows[5]["ctx_scores"] is None
    assert rows[9]["ctx_score_error"] == "unknown_role:narrator"
    assert rows[7]["ctx_scores"] == [None] and rows[7]["ctx_score_reasons"] == ["empty_response"]
    assert isinstance(rows[3]["ctx_scores"][0], float)
    assert summary.row_errors == {"no_assistant_turn": 1, "unknown_role": 1}
    assert summary.turn_reasons == {"empty_response": 1}
    assert summary.turns_scored == 20 and summary.complete
    assert not out.with_name(out.name + ".partial.jsonl").exists()
    again = score_dataset(model, tok, data, out, ScoringConfig(batch_size=4), progress=False)
    assert again.rows == 0 and again.complete  # nothing to do


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # as the parent test: same kernels, bit-identical scores
    sys.path.insert(0, sys.argv[1])
    from test_measure_models import one_thread, tiny_model, tiny_tokenizer  # noqa: F401
    from ctxaware.scoring import ScoringConfig, score_dataset
    from ctxaware.scoring.probe import Scorer

    real, calls = Scorer.score_many, []

    def killed_in_fourth_batch(self, convs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, convs)

    Scorer.score_many = killed_in_fourth_batch
    score_dataset(tiny_model("llama"), tiny_tokenizer("chatml"), sys.argv[2], sys.argv[3],
                  ScoringConfig(batch_size=3), progress=False)
""")


def test_resume_after_kill_9_is_identical(probe, data, tmp_path):
    """A run killed with SIGKILL in its 4th batch keeps the 3 finished batches; the rerun skips them
    and writes byte-for-byte the output of an uninterrupted run."""
    model, tok = probe
    cfg = ScoringConfig(batch_size=3)
    ref = tmp_path / "ref.jsonl"
    score_dataset(model, tok, data, ref, cfg, progress=False)

    out = tmp_path / "resumed.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(Path(__file__).parent), str(data), str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    partial = out.with_name(out.name + ".partial.jsonl")
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 9  # metadata + 3 batches of 3: at most the batch in flight was lost
    with partial.open("a") as fh:
        fh.write('{"_row": 1, "ctx_sc')  # and a line torn by the kill
    summary = score_dataset(model, tok, data, out, cfg, progress=False)
    assert summary.skipped == 9 and summary.rows == 23
    assert out.read_bytes() == ref.read_bytes()
    assert not partial.exists()


def test_resume_after_exception_is_identical(probe, data, tmp_path, monkeypatch):
    model, tok = probe
    cfg = ScoringConfig(batch_size=4)
    ref = tmp_path / "ref.parquet"
    score_dataset(model, tok, data, ref, cfg, progress=False)
    out = tmp_path / "resumed.parquet"
    real, calls = Scorer.score_many, []

    def flaky(self, convs):
        calls.append(1)
        if len(calls) in (2, 5):
            raise KeyboardInterrupt
        return real(self, convs)

    monkeypatch.setattr(Scorer, "score_many", flaky)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            score_dataset(model, tok, data, out, cfg, progress=False)
    summary = score_dataset(model, tok, data, out, cfg, progress=False)
    assert summary.skipped == 4 + 8
    assert read_rows(out) == read_rows(ref)


def test_resume_refuses_other_settings(probe, data, tmp_path, monkeypatch):
    model, tok = probe
    out = tmp_path / "s.jsonl"
    real = Scorer.score_many
    monkeypatch.setattr(Scorer, "score_many", lambda self, c: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        score_dataset(model, tok, data, out, ScoringConfig(), progress=False)
    monkeypatch.setattr(Scorer, "score_many", real)
    with pytest.raises(ConfigError, match="layer"):
        score_dataset(model, tok, data, out, ScoringConfig(layer=1), progress=False)
    changed = tmp_path / "changed.jsonl"
    write_rows(_rows()[:-1], changed)
    changed.replace(data)
    with pytest.raises(ConfigError, match="sha256"):
        score_dataset(model, tok, data, out, ScoringConfig(), progress=False)
    assert score_dataset(model, tok, data, out, ScoringConfig(layer=1), progress=False, overwrite=True).complete


def test_shards_merge_to_the_single_run(probe, data, tmp_path):
    model, tok = probe
    single = tmp_path / "single.jsonl"
    score_dataset(model, tok, data, single, ScoringConfig(batch_size=4), progress=False)
    out = tmp_path / "sharded.parquet"
    for i in range(3):
        s = score_dataset(model, tok, data, out, ScoringConfig(batch_size=4), shard=(i, 3), progress=False)
        assert s.output.name == f"sharded.shard-{i}-of-3.parquet"
    merged = read_rows(merge_shards(out))
    expected = read_rows(single)
    assert [r["id"] for r in merged] == list(range(23))
    for m, e in zip(merged, expected):
        assert m["ctx_score_error"] == e["ctx_score_error"]
        for a, b in zip(m["ctx_scores"] or [], e["ctx_scores"] or []):
            assert (a is None and b is None) or abs(a - b) < 1e-5


def test_merge_reports_missing_shards(probe, data, tmp_path):
    model, tok = probe
    out = tmp_path / "m.jsonl"
    score_dataset(model, tok, data, out, shard=(0, 2), progress=False)
    with pytest.raises(InputError):
        merge_shards(out)
    with pytest.raises(InputFileNotFoundError):
        merge_shards(tmp_path / "none.jsonl")


def test_parse_shard(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ConfigError):
        parse_shard("4/4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert parse_shard(None) == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_shard(None) == (0, 1)


def test_formats_and_load_conversations(tmp_path):
    rows = [r for i, r in enumerate(_rows()[:9]) if i != 5]
    for ext in ("jsonl", "json", "parquet"):
        path = write_rows(rows, tmp_path / f"d.{ext}")
        convs = load_conversations(path)
        assert len(convs) == len(rows)
        assert all("conversations" not in c and c["messages"][0]["role"] == "user" for c in convs)
        assert convs[3]["messages"][1] == {"role": "assistant", "content": "Paris."}
    import datasets

    datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows if "messages" in r]).save_to_disk(
        str(tmp_path / "hf"))
    assert len(load_conversations(tmp_path / "hf")) == len(rows) - 1
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{not json\n')
    with pytest.raises(InputError):
        read_rows(tmp_path / "bad.jsonl")
    with pytest.raises(InputFileNotFoundError):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(InputError):
        load_conversations(write_rows([{"conversations": [{"from": "narrator", "value": "x"}]}], tmp_path / "b.json"))


def test_cli_score_shards_merge_then_indicate(probe, data, tmp_path, monkeypatch, capsys):
    from ctxaware.cli.main import main

    model, tok = probe
    monkeypatch.setattr("ctxaware.models.load_model",
                        lambda *a, **k: type("L", (), {"model": model, "tokenizer": tok, "name": "tiny"})())
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--in", str(data), "--out", str(out), "--no-progress", "--json", "--batch-size", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 23 and summary["row_errors"] == {"no_assistant_turn": 1, "unknown_role": 1}
    assert summary["layer"] == 2 and summary["turns_scored"] == 20
    assert main(["score", "--in", str(data), "--out", str(out)]) == 0
    assert "already exists" in capsys.readouterr().out

    sharded = tmp_path / "sharded.jsonl"
    for i in range(2):
        assert main(["score", "--in", str(data), "--out", str(sharded), "--shard", f"{i}/2", "--no-progress",
                     "--batch-size", "5"]) == 0
    text = capsys.readouterr().out
    assert "turns scored" in text and "rows kept unscored" in text and "--merge" in text
    assert main(["score", "--merge", "--out", str(sharded)]) == 0
    merged, single = read_rows(sharded), read_rows(out)
    assert [r["id"] for r in merged] == [r["id"] for r in single]
    for m, e in zip(merged, single):
        assert m["ctx_score_error"] == e["ctx_score_error"]
        for a, b in zip(m["ctx_scores"] or [], e["ctx_scores"] or []):
            assert (a is None and b is None) or abs(a - b) < 1e-6
    assert main(["score", "--in", str(data), "--out", str(tmp_path / "x.txt")]) == 2
    assert "x.txt" in capsys.readouterr().err

    scores = sorted(r["ctx_scores"][0] for r in single if r["ctx_scores"] and r["ctx_scores"][0] is not None)
    threshold = scores[len(scores) // 2]  # about half above, half at or below
    labelled = tmp_path / "labelled.jsonl"
    assert main(["indicate", "--in", str(out), "--out", str(labelled), "--threshold", str(threshold)]) == 0
    text = capsys.readouterr().out
    assert all(f"{t}" in text for t in ("0.5", "0.6", "0.7", "0.8"))
    rows = read_rows(labelled)
    assert len(rows) == 22 and all("ctx_scores" not in r and "messages" in r for r in rows)  # narrator row dropped
    by_id = {r["id"]: r for r in single}
    for r in rows:
        s = (by_id[r["id"]]["ctx_scores"] or [None])[0]
        expected = s is not None and s > threshold
        assert r["messages"][0]["content"].endswith(" [IND]") == expected
    assert 0 < sum(r["messages"][0]["content"].endswith(" [IND]") for r in rows) < 20
