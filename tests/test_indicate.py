"""The [IND] indicator: strict threshold, the right user turn, round trip with strip_indicator."""

from __future__ import annotations

import json

import pytest

from ctxaware.errors import InputError
from ctxaware.scoring import INDICATOR, apply_indicator, label_fractions, strip_indicator, write_rows

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Read this: cats sleep"},
        {"role": "assistant", "content": "They sleep."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."}]


def test_strictly_above_threshold_labels_the_preceding_user_turn():
    out = apply_indicator(CHAT, [0.6, 0.61], threshold=0.6)
    assert out[1]["content"] == "Read this: cats sleep"  # equal to the threshold: not labelled
    assert out[3]["content"] == "Thanks " + INDICATOR
    assert out[0] == CHAT[0] and out[2] == CHAT[2]
    assert CHAT[3]["content"] == "Thanks"  # input untouched


def test_undefined_scores_and_period_quirk():
    out = apply_indicator(CHAT, [None, float("nan")], threshold=0.0)
    assert out == CHAT
    out = apply_indicator(CHAT, [0.9, 0.1], threshold=0.5, add_period=True)
    assert out[1]["content"] == "Read this: cats sleep. [IND]"
    assert out[3]["content"] == "Thanks."


def test_strip_round_trip_and_no_double_label():
    labelled = apply_indicator(CHAT, [0.9, 0.9], threshold=0.5)
    assert apply_indicator(labelled, [0.9, 0.9], threshold=0.5) == labelled
    assert strip_indicator(labelled) == CHAT


def test_score_count_must_match_turns():
    with pytest.raises(InputError):
        apply_indicator(CHAT, [0.9], threshold=0.5)


def test_label_fractions():
    fr = label_fractions([[0.55, 0.65], [0.75, None], None, [0.85]], thresholds=(0.5, 0.6, 0.7, 0.8))
    assert fr[0.5] == {"turns": 1.0, "rows": 1.0}
    assert fr[0.6]["turns"] == 0.75 and fr[0.7]["turns"] == 0.5 and fr[0.8]["turns"] == 0.25
    assert fr[0.8]["rows"] == pytest.approx(1 / 3)


def test_cli_indicate_sharegpt_rows(tmp_path, capsys):
    import argparse

    from ctxaware.cli import indicate
    from ctxaware.scoring import read_rows

    rows = [{"conversations": [{"from": "human", "value": "Doc: x. Q?"}, {"from": "gpt", "value": "x"}],
             "ctx_scores": [0.7], "ctx_score_reasons": [None], "ctx_score_error": None},
            {"messages": CHAT, "ctx_scores": [0.2, 0.9], "ctx_score_reasons": [None, None], "ctx_score_error": None}]
    src = write_rows(rows, tmp_path / "scored.parquet")
    parser = argparse.ArgumentParser()
    indicate.add_arguments(parser)
    out = tmp_path / "lab.jsonl"
    assert indicate.run(parser.parse_args(["--in", str(src), "--out", str(out), "--threshold", "0.6", "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labelled"]["turns"] == pytest.approx(2 / 3)
    got = read_rows(out)
    assert got[0]["messages"][0]["content"] == "Doc: x. Q? [IND]" and "conversations" not in got[0]
    assert got[1]["messages"][3]["content"].endswith(INDICATOR)
    assert not got[1]["messages"][1]["content"].endswith(INDICATOR)
