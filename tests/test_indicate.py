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


def test_top_fraction_labels_exactly_the_top_turns_with_ties_in_file_order():
    from ctxaware.scoring.indicator import top_fraction_labels

    lists = [[0.5, 0.9], None, [0.5, float("nan")], [0.7, 0.5]]
    sel = top_fraction_labels(lists, 0.4)  # 5 scored turns -> 2 labelled
    assert sel.scored == 5 and sel.labelled == 2 and sel.beta == 0.7
    assert sel.labels == [[False, True], [], [False, False], [True, False]]
    sel = top_fraction_labels(lists, 0.6)  # 3: the third is one of three tied 0.5 scores, the earliest
    assert sel.labels == [[True, True], [], [False, False], [True, False]] and sel.beta == 0.5
    assert top_fraction_labels(lists, 0.0).labelled == 0 and top_fraction_labels(lists, 0.0).beta is None
    assert top_fraction_labels(lists, 1.0).labelled == 5
    with pytest.raises(InputError, match="fraction"):
        top_fraction_labels(lists, 1.5)


def test_threshold_for_fraction_labels_at_most_the_target_under_the_strict_rule():
    import random

    from ctxaware.scoring.indicator import threshold_for_fraction

    rng = random.Random(0)
    lists = [[rng.random() for _ in range(rng.randint(0, 4))] for _ in range(200)]
    n = sum(len(sl) for sl in lists)
    for f in (0.0, 0.1, 0.18, 0.23, 0.5, 1.0):
        beta = threshold_for_fraction(lists, f)
        assert label_fractions(lists, (beta,))[beta]["turns"] == pytest.approx(round(f * n) / n)
    tied = [[0.5, 0.5, 0.5, 0.9]]
    beta = threshold_for_fraction(tied, 0.5)  # the boundary is a tie: the tied turns all stay out
    assert beta == 0.5 and label_fractions(tied, (beta,))[beta]["turns"] == 0.25
    with pytest.raises(InputError, match="no scored turn"):
        threshold_for_fraction([[None]], 0.1)


def test_dataset_kind_detection():
    from ctxaware.scoring.indicator import detect_dataset_kind

    assert detect_dataset_kind("data/ShareGPT_V3_unfiltered.json") == "sharegpt"
    assert detect_dataset_kind("ultrachat_200k/train.parquet") == "ultrachat"
    assert detect_dataset_kind("WizardLM_evol_instruct_70k.json") == "wizardlm"
    assert detect_dataset_kind("scored.jsonl", [{"prompt_id": "a"}, {"prompt_id": "b"}]) == "ultrachat"
    assert detect_dataset_kind("scored.jsonl", [{"source": "wizardlm_testset"}] * 2) == "wizardlm"
    assert detect_dataset_kind("scored.jsonl", [{"source": "wizardlm"}, {"source": "alpaca"}]) is None
    assert detect_dataset_kind("mixed.jsonl", [{"messages": []}]) is None


def _scored_file(tmp_path, name="scored.jsonl"):
    rows = [{"messages": CHAT, "ctx_scores": [0.1 * (i % 10), 0.05 * (i % 20)]} for i in range(50)]
    return write_rows(rows, tmp_path / name)


def _run_indicate(capsys, *argv):
    from ctxaware.cli.main import main

    rc = main(["indicate", *argv])
    captured = capsys.readouterr()
    return rc, captured


def test_cli_target_fraction_and_auto_threshold(tmp_path, capsys):
    from ctxaware.scoring import read_rows

    src = _scored_file(tmp_path)
    out = tmp_path / "lab.jsonl"
    rc, cap = _run_indicate(capsys, "--in", str(src), "--out", str(out), "--target-fraction", "0.15", "--json")
    assert rc == 0
    report = json.loads(cap.out)
    assert report["rule"] == "target-fraction" and report["scored_turns"] == 100 and report["labelled_turns"] == 15
    got = read_rows(out)
    assert sum(m["content"].endswith(INDICATOR) for r in got for m in r["messages"] if m["role"] == "user") == 15

    kind_src = _scored_file(tmp_path, "sharegpt_scored.jsonl")
    rc, cap = _run_indicate(capsys, "--in", str(kind_src), "--out", str(out), "--threshold", "auto", "--json")
    report = json.loads(cap.out)
    assert rc == 0 and report["dataset_kind"] == "sharegpt" and report["target_fraction"] == 0.10
    assert report["labelled"]["turns"] <= 0.10 + 1e-9
    assert report["labelled"]["turns"] == label_fractions(
        [r["ctx_scores"] for r in read_rows(kind_src)], (report["threshold"],))[report["threshold"]]["turns"]
    rc, cap = _run_indicate(capsys, "--in", str(src), "--out", str(out), "--threshold", "auto",
                            "--dataset-kind", "wizardlm", "--json")
    assert rc == 0 and json.loads(cap.out)["target_fraction"] == 0.23

    rc, cap = _run_indicate(capsys, "--in", str(src), "--out", str(out), "--threshold", "auto")
    assert rc == 2 and "--dataset-kind" in cap.err and len(cap.err.strip().splitlines()) == 1
    rc, cap = _run_indicate(capsys, "--in", str(src), "--out", str(out), "--threshold", "0.5",
                            "--target-fraction", "0.1")
    assert rc == 2 and "not both" in cap.err
