"""The sft-study's arm comparisons are paired tests over the same items (issue 28, item 3), on two arm
directories written by hand (no model): NIH cells paired by (length, depth, needle) with the exact McNemar test
(its p-value checked against a brute-force binomial sum written here), a paired permutation test for fractional
recall and for MT-Bench scores paired by (question, turn) (checked against a brute-force enumeration of sign
flips), the wording when significant and when not, differences made of cut answers not attributed, and QA said to
be unpaired."""

from __future__ import annotations

import itertools
import json
import re
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from ctxaware.sftstudy.report import UNPAIRED_QA, compare, table, verdicts

LENGTHS, DEPTHS = (200, 400, 800, 1600), (0.0, 50.0, 100.0)
CELLS = [(L, d) for L in LENGTHS for d in DEPTHS]  # 12 cells


def mcnemar_p(first_only: int, second_only: int) -> float:
    """Exact two-sided McNemar: the binomial(d, 1/2) tail at the smaller count, doubled, capped at 1."""
    d = first_only + second_only
    tail = sum(Fraction(comb(d, i), 2 ** d) for i in range(min(first_only, second_only) + 1))
    return float(min(Fraction(1), 2 * tail))


def sign_flip_p(diffs: list[float]) -> float:
    """Exact paired permutation p: the share of the 2^m sign flips of the non-zero differences whose |sum| reaches
    the observed one."""
    nz = [x for x in diffs if x != 0]
    obs = abs(sum(nz))
    hits = sum(abs(sum(s * x for s, x in zip(signs, nz))) >= obs - 1e-12
               for signs in itertools.product((1, -1), repeat=len(nz)))
    return hits / 2 ** len(nz)


def _write_arm(out: Path, arm: str, modes: dict[str, list[float]], cut: dict[str, set[int]] | None = None,
               judgments: list[tuple[str, int, float]] = ()) -> None:
    d = out / arm / "niah"
    d.mkdir(parents=True)
    lines = []
    for mode, recalls in modes.items():
        for i, ((L, dep), rec) in enumerate(zip(CELLS, recalls)):
            truncated = i in (cut or {}).get(mode, set())
            lines.append({"key": f"{mode}|{L}|{dep}", "model": arm, "mode": mode, "needle": "SF", "length": L,
                          "depth": dep, "recall": rec, "truncated": truncated,
                          "answer_tokens": 8 if truncated else 3})
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if judgments:
        m = out / arm / "mtbench"
        m.mkdir(parents=True)
        (m / "judgments.jsonl").write_text("".join(
            json.dumps({"model": arm, "condition": "chat", "judge": "fake", "judge_url": "http://j", "question_id": q,
                        "turn": t, "score": s}) + "\n" for q, t, s in judgments))


def _study(tmp_path: Path, vanilla: list[float], cond_ind: list[float], cond_plain: list[float] | None = None,
           cut: dict[str, set[int]] | None = None, mt: tuple[list, list] | None = None) -> dict:
    out = tmp_path / "study"
    out.mkdir()
    config = {"model": "tiny", "dataset": "d.jsonl", "modes": ["chat+prefix"],
              "mtbench_judge_url": "http://j" if mt else None}
    (out / "sft_study.json").write_text(json.dumps({"config": config, "stages": {}}))
    _write_arm(out, "vanilla", {"chat+prefix": vanilla}, cut, mt[0] if mt else ())
    _write_arm(out, "conditional", {"chat+prefix+ind": cond_ind, "chat+prefix": cond_plain or vanilla}, cut,
               mt[1] if mt else ())
    return table(out)


def _first(found: list[dict], column: str, b: str = "vanilla"):
    return next(f for f in found if f.numbers["column"] == column and f.numbers["b"] == b)


def test_significant_nih_difference_is_a_paired_mcnemar_with_its_interval_and_mde(tmp_path):
    vanilla = [0.0] * 10 + [1.0] * 2
    tab = _study(tmp_path, vanilla, [1.0] * 12)
    f = _first(verdicts(tab), "NIH chat+prefix")
    t = f.numbers["test"]
    assert f.numbers["paired"] and t["test"] == "exact McNemar" and t["n"] == 12
    assert (t["extra"]["first_only"], t["extra"]["second_only"]) == (10, 0)
    assert t["p"] == pytest.approx(mcnemar_p(10, 0), abs=1e-12)  # 2 / 2^10
    assert t["effect"] == pytest.approx(10 / 12)
    assert "Exact McNemar over the 12 paired cells: +10 cells (+0.83, 95 % CI" in f.text
    assert "p = 0.002" in f.text and "significant at the 5 % level" in f.text
    assert "at n = 12 only a difference of ≥" in f.text  # the minimum detectable effect at this n
    assert f.text.endswith("conditional + [IND] is better on this column.")
    assert "two standard errors" not in f.text and "unpaired" not in f.text
    # the same cells without [IND] equal vanilla's: the ablation comparison is paired and significant too
    assert "significant at the 5 % level" in _first(verdicts(tab), "NIH chat+prefix",
                                                    "conditional, no [IND] (ablation)").text


def test_small_nih_difference_is_no_difference_detected(tmp_path):
    vanilla = [1.0] * 12
    cond = [0.0, 0.0] + [1.0] * 10  # conditional loses 2
    vanilla[5] = 0.0  # ... and finds 1 vanilla lost: 1 vs 2 discordant
    f = _first(verdicts(_study(tmp_path, vanilla, cond)), "NIH chat+prefix")
    assert f.numbers["test"]["p"] == pytest.approx(mcnemar_p(1, 2), abs=1e-12) == 1.0
    assert "-1 cells" in f.text and "p = 1.00" in f.text
    assert "no difference detected at n = 12" in f.text
    assert "better" not in f.text and "worse" not in f.text and "significant at" not in f.text


def test_a_difference_made_of_cut_answers_is_not_attributed(tmp_path):
    vanilla = [0.0] * 10 + [1.0] * 2
    # every cell vanilla loses was cut at the budget (8 tokens): the difference is the budget's, not the arms'
    f = _first(verdicts(_study(tmp_path, vanilla, [1.0] * 12, cut={"chat+prefix": set(range(10))})), "NIH chat+prefix")
    assert f.numbers["truncated_differ"] == 10
    assert "10 of the 10 cells that differ hold an answer cut by the 8-token budget" in f.text
    assert "not evidence either way" in f.text and "no difference detected at n = 2" in f.text
    assert f.numbers["test"]["p"] == pytest.approx(mcnemar_p(10, 0))  # the test over all cells is still stated
    assert not f.numbers["decisive"]["significant"] and "better" not in f.text


def test_fractional_recall_is_a_paired_permutation_test(tmp_path):
    vanilla = [0.5] * 6 + [1.0] * 6
    cond = [1.0] * 5 + [0.5] + [1.0] * 5 + [0.5]
    f = _first(verdicts(_study(tmp_path, vanilla, cond)), "NIH chat+prefix")
    t = f.numbers["test"]
    diffs = [c - v for c, v in zip(cond, vanilla)]
    assert t["test"] == "paired permutation" and t["n"] == 12
    assert t["effect"] == pytest.approx(sum(diffs) / 12)
    assert t["p"] == pytest.approx(sign_flip_p(diffs), abs=1e-12)
    assert t["ci"][0] <= t["effect"] <= t["ci"][1]
    assert "Paired permutation test of recall over the 12 paired cells" in f.text and "95 % bootstrap CI" in f.text
    assert "no difference detected at n = 12" in f.text and "only a mean difference of ≥" in f.text


def test_mtbench_is_paired_by_question_and_turn(tmp_path):
    van = [("q1", 1, 5.0), ("q1", 2, 4.0), ("q2", 1, 6.0), ("q2", 2, 3.0), ("q3", 1, 2.0)]
    con = [("q1", 1, 7.0), ("q1", 2, 6.0), ("q2", 1, 9.0), ("q2", 2, 6.0), ("q4", 1, 10.0)]  # q3/q4: not paired
    tab = _study(tmp_path, [1.0] * 12, [1.0] * 12, mt=(van, con))
    found = verdicts(tab)
    f = _first(found, "MT-Bench")
    diffs = [2.0, 2.0, 3.0, 3.0]
    assert f.numbers["pairs"] == 4 and f.numbers["test"]["effect"] == pytest.approx(2.5)
    assert f.numbers["test"]["p"] == pytest.approx(sign_flip_p(diffs)) == pytest.approx(2 / 16)
    assert "over the 4 (question, turn) pairs judged in both arms: +2.500" in f.text
    assert "no difference detected at n = 4" in f.text
    assert not any(x.numbers["column"] == "MT-Bench" and x.numbers["b"] != "vanilla" for x in found)  # no ablation run
    # identical NIH grids: no difference, and no minimum detectable effect is invented for McNemar
    nih = _first(found, "NIH chat+prefix")
    assert "+0 cells" in nih.text and "no difference detected at n = 12" in nih.text


def test_qa_aggregates_are_called_unpaired():
    f = compare("SQuAD", "c", {"value": 0.6, "se": 0.1, "n": 3}, "v", {"value": 0.5, "se": 0.1, "n": 3})
    assert f.text.endswith(f"({UNPAIRED_QA}).") and not f.numbers["paired"]
    assert re.search(r"no clear difference \(within two standard errors, 0\.283\)", f.text)
