"""The report: verdict sentences against independent counts, page content, several models, CLI errors."""

from __future__ import annotations

import base64
import io
import json
import random
import re
from pathlib import Path

import pytest

from ctxaware.cli.main import main
from ctxaware.report import build_report, load_results
from ctxaware.report.html import findings

MODES = ("raw+prefix", "chat+prefix", "chat+prefix+steer", "chat")
LENGTHS = (1000, 3000, 5000, 7000)
DEPTHS = (0, 25, 50, 75, 100)


def write_niah_dir(d: Path, model: str, seed: int) -> Path:
    """A NIH results directory of synthetic cells whose recall pattern depends on ``seed``."""
    rng = random.Random(seed)
    d.mkdir(parents=True)
    with open(d / "results.jsonl", "w") as fh:
        for L in LENGTHS:
            for dep in DEPTHS:
                for mode in MODES:
                    p_lost = {"raw+prefix": 0.15, "chat+prefix": 0.35, "chat+prefix+steer": 0.25, "chat": 0.6}[mode]
                    p_lost += 0.3 if L >= 5000 and dep <= 50 else 0.0
                    rec = 1.0 if rng.random() > p_lost else rng.choice([0.0, 0.25, 0.5, 6 / 7])
                    row = {"key": f"{model}|{mode}|SF|L={L}|d={dep}|builtin:x", "model": model, "mode": mode,
                           "needle": "SF", "haystack": "builtin:x", "length": L, "tokens": L - 10, "depth": dep,
                           "answer": "…", "recall": rec, "seconds": 0.1}
                    if mode.endswith("steer"):
                        row["alpha"], row["heads"] = 0.9, "all"
                    fh.write(json.dumps(row) + "\n")
        fh.write('{"key": "torn')  # a torn last line is tolerated
    (d / "manifest.json").write_text(json.dumps({"study": {"model": model}, "config": {"model": model},
                                                 "versions": {"ctxaware": "test"}}))
    return d


def independent_counts(d: Path) -> dict[str, dict[tuple[int, float], float]]:
    cells: dict[str, dict[tuple[int, float], float]] = {}
    for line in (d / "results.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        cells.setdefault(r["mode"], {})[(r["length"], float(r["depth"]))] = r["recall"]
    return cells


def _lost(cells):
    return {c for c, v in cells.items() if v != 1.0}


def _mcnemar_p(first, second) -> float:
    """Exact McNemar p-value, independently: the probability of every split of the discordant cells no more
    likely than the observed one, under a fair coin (exact fractions)."""
    from fractions import Fraction
    from math import comb

    up = sum(1 for c in first if first[c] == 1.0 and second[c] != 1.0)
    down = sum(1 for c in first if first[c] != 1.0 and second[c] == 1.0)
    d = up + down
    probs = [Fraction(comb(d, i), 2 ** d) for i in range(d + 1)]
    return float(sum(q for q in probs if q <= probs[up]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_verdict_sentences_state_independently_counted_numbers(tmp_path, seed):
    d = write_niah_dir(tmp_path / "n", "m", seed)
    c = independent_counts(d)
    (m,) = load_results([d])
    by_kind = {}
    for f in findings(m):
        by_kind.setdefault(f.kind, []).append(f.text)
    n = len(LENGTHS) * len(DEPTHS)
    tmpl = by_kind["template"][0]
    chat_lost, raw_lost = len(_lost(c["chat+prefix"])), len(_lost(c["raw+prefix"]))
    assert f"(chat+prefix) the model loses the needle in {chat_lost} of {n} cells" in tmpl
    assert f"(raw+prefix) in {raw_lost} of {n} cells" in tmpl
    diff = chat_lost - raw_lost
    if diff > 0:  # the wording follows the test (exact McNemar, recomputed by brute force)
        assert (f"the template costs {diff} cell" in tmpl) == (_mcnemar_p(c["raw+prefix"], c["chat+prefix"]) < 0.05)
        assert (f"{diff} cell{'s' if diff > 1 else ''} more lost with the template, within chance" in tmpl) == (
            _mcnemar_p(c["raw+prefix"], c["chat+prefix"]) >= 0.05)
    p = _mcnemar_p(c["raw+prefix"], c["chat+prefix"])
    assert f"p = {p:.2f}" in tmpl or f"p = {p:.3f}" in tmpl or (p < 0.001 and "p = < 0.001" in tmpl)
    assert ("no difference detected at n = 20" in tmpl) == (p >= 0.05)
    steer = by_kind["steering"][0]
    recovered = len(_lost(c["chat+prefix"]) - _lost(c["chat+prefix+steer"]))
    assert f"recovers {recovered} of the {chat_lost} cells chat+prefix loses" in steer
    assert f"chat+prefix+steer loses {len(_lost(c['chat+prefix+steer']))} of {n}" in steer
    assert "α = 0.9" in steer
    newly = len(_lost(c["chat+prefix+steer"]) - _lost(c["chat+prefix"]))
    assert (f"loses {newly} it found" in steer) == (newly > 0)
    ps = _mcnemar_p(c["chat+prefix+steer"], c["chat+prefix"])
    assert f"{recovered - newly:+d} cells" in steer and ("no difference detected" in steer) == (ps >= 0.05)
    prefix = by_kind["prefix"][0]
    mean = sum(c["chat"].values()) / n
    assert f"(chat) the model loses the needle in {len(_lost(c['chat']))} of {n}" in prefix
    assert f"mean recall {mean:.2f}" in prefix
    everywhere = set.intersection(*(_lost(v) for v in c.values()))
    if everywhere:
        assert f"Every mode loses the needle in {len(everywhere)} of {n}" in by_kind["length"][0]
    else:
        assert "length" not in by_kind
    # where the lost cells are: the stated ranges hold for the counted cells
    lost_cells = _lost(c["chat+prefix"])
    mt = re.search(r"chat\+prefix\) the model loses the needle in \d+ of \d+ cells \(all at ≥ (\d+) tokens and "
                   r"depths ≤ (\d+) %\)", tmpl)
    if mt:
        assert int(mt.group(1)) == min(L for L, _ in lost_cells) and float(mt.group(2)) == max(x for _, x in lost_cells)


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_page_is_self_contained_with_tables_and_valid_images(tmp_path):
    from PIL import Image

    d = write_niah_dir(tmp_path / "n", "model-a", 0)
    out = build_report([d], tmp_path / "r.html")
    page = out.read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert 'class="verdict"' in page and 'class="niah"' in page and "Provenance" in page
    imgs = _pngs(page)
    assert len(imgs) == page.count("<img") == 2  # heatmaps + recall vs length
    for data in imgs:
        im = Image.open(io.BytesIO(data))
        im.verify()
        assert im.size[0] > 200 and im.size[1] > 100
    # the table's counts are the independent ones
    c = independent_counts(d)
    for mode, cells in c.items():
        found = sum(1 for v in cells.values() if v == 1.0)
        assert re.search(rf"<td>{re.escape(mode)}</td><td>{found}/{len(cells)}</td>", page)


def test_several_models_side_by_side(tmp_path):
    a = write_niah_dir(tmp_path / "a", "model-a", 1)
    b = write_niah_dir(tmp_path / "b", "model-b", 2)
    models = load_results([tmp_path])  # sub-directories are searched
    assert [m.model for m in models] == ["model-a", "model-b"]
    page = build_report([a, b], tmp_path / "r.html").read_text()
    assert "model-a: needle found" in page and "model-b: needle found" in page
    assert page.count('<ul class="verdict">') == 2 and page.count("NIH heatmaps of") == 2


def test_qa_and_calibration_directories(tmp_path):
    from ctxaware.steering import SteeringConfig
    from ctxaware.steering.file import write_steering_file

    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text(json.dumps({
        "results": {"ctxaware_squad_no_ind": {"alias": "squad", "contains,none": 0.42, "contains_stderr,none": 0.07}},
        "n-samples": {"ctxaware_squad_no_ind": {"original": 100, "effective": 50}}}))
    cal = tmp_path / "cal"
    write_steering_file(cal / "steering.yaml", SteeringConfig(alpha=0.8, heads="3:0"), {"model": "m"})
    page = build_report([ev, cal], tmp_path / "r.html").read_text()
    assert "<td>ctxaware_squad_no_ind</td><td>contains</td><td>0.420</td><td>0.070</td><td class=\"num\">50</td>" in page
    assert "Calibration" in page and "3:0" in page
    assert "SQUAD: eval contains 0.42 ± 0.07" in page  # the variant is the directory's name


def test_cli_report_one_line_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert "no results found" in capsys.readouterr().err
    d = write_niah_dir(tmp_path / "n", "model-a", 3)
    assert main(["report", str(d), "--out", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "model-a" in out and "wrote" in out and (tmp_path / "r.html").is_file()


def test_niah_command_in_provenance_reproduces_the_config():
    import shlex

    from ctxaware.cli.main import build_parser
    from ctxaware.cli.options import config_from_args
    from ctxaware.niah import NiahConfig
    from ctxaware.report.load import niah_command

    cfg = NiahConfig(lengths="1000,3000", depths="0,12.5", modes="raw,chat+steer", alpha=0.5, system_message=False,
                     needle="pizza", out="runs/x")
    cmd = niah_command(cfg.to_dict(), Path("runs/x"))
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert config_from_args(NiahConfig, args).to_dict() == cfg.to_dict()


def test_verdict_names_answers_cut_by_the_budget(tmp_path):
    """Cells that differ only through answers cut at max_new_tokens are not attributed to the template."""
    d = tmp_path / "n"
    d.mkdir()
    rows = []
    for i, dep in enumerate(range(0, 100, 5)):  # 20 cells
        for mode in ("raw+prefix", "chat+prefix"):
            cut = mode == "chat+prefix" and i < 7  # the template's answers run longer and get cut in 7 cells
            rows.append({"key": f"{mode}{dep}", "model": "m", "mode": mode, "needle": "SF", "haystack": "h",
                         "length": 1000, "tokens": 990, "depth": dep, "answer": "…",
                         "recall": 0.5 if cut else 1.0, "truncated": cut, "answer_tokens": 24 if cut else 12})
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "manifest.json").write_text(json.dumps({"study": {"model": "m"}, "config": {"model": "m"}}))
    (m,) = load_results([d])
    found = {f.kind: f for f in findings(m)}
    tmpl = found["template"]
    assert tmpl.numbers["test"]["significant"]  # 7 of 7 one way: p = 2/128 without looking at the cut
    assert "7 of the 7 cells that differ hold an answer cut by the 24-token budget" in tmpl.text
    assert "without them +0 cells, p = 1.00: no difference detected at n = 13" in tmpl.text
    assert "--max-new-tokens 48" in tmpl.text and "the template costs" not in tmpl.text
    assert "7 cells more lost with the template, made of answers cut by the token budget" in tmpl.text
    assert tmpl.numbers["test_without_truncated"]["p"] == 1.0
    assert "chat+prefix 7/20" in found["truncated"].text and "raw+prefix 0/20" in found["truncated"].text


def test_phrasings_pooled_and_per_phrasing(tmp_path):
    """Three phrasings of one needle (tasks SF, SF@q1, SF@q2): per-phrasing verdicts, and a pooled McNemar test
    over every (phrasing, cell) pair whose p-value is recomputed by brute force."""
    rng = random.Random(7)
    d = tmp_path / "n"
    d.mkdir()
    rows = []
    for i, needle in enumerate(("SF", "SF@q1", "SF@q2")):
        for L in (1000, 3000):
            for dep in (0, 25, 50, 75, 100):
                for mode in ("raw+prefix", "chat+prefix"):
                    lost_p = 0.2 + (0.3 if mode == "chat+prefix" and i != 1 else 0)
                    rows.append({"key": f"{needle}|{mode}|{L}|{dep}", "model": "m", "mode": mode, "needle": needle,
                                 "haystack": "h", "length": L, "tokens": L, "depth": dep, "answer": "…",
                                 "recall": 0.0 if rng.random() < lost_p else 1.0})
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "manifest.json").write_text(json.dumps({"study": {"model": "m"}, "config": {"model": "m"}}))
    (m,) = load_results([d])
    found = [f for f in findings(m) if f.kind == "phrasings"]
    assert len(found) == 1 and "SF over 3 phrasings" in found[0].text
    pooled = {c: v for c, v in ((("raw", r["needle"], r["length"], r["depth"]), r["recall"]) for r in rows
                                if r["mode"] == "raw+prefix")}
    chat = {("raw",) + c[1:]: v for c, v in ((("c", r["needle"], r["length"], r["depth"]), r["recall"]) for r in rows
                                             if r["mode"] == "chat+prefix")}
    assert found[0].numbers["test"]["p"] == pytest.approx(_mcnemar_p(chat, pooled))
    assert found[0].numbers["test"]["n"] == 30 and len(found[0].numbers["by_phrasing"]) == 3
    effects = [p["effect"] for p in found[0].numbers["by_phrasing"]]
    assert f"spread {max(effects) - min(effects):.2f}" in found[0].text
    assert sum(1 for f in findings(m) if f.kind == "template") == 3  # one verdict per phrasing too


def test_attention_over_all_heads_recomputed(tmp_path):
    """The head finding's counts and tests against independent computations on synthetic per-head shares."""
    from fractions import Fraction
    from math import comb

    rng = random.Random(3)
    L, H = 6, 9
    none = [[rng.uniform(0.2, 0.9) for _ in range(H)] for _ in range(L)]
    tmpl = [[v - rng.uniform(-0.05, 0.1) for v in row] for row in none]
    shares = {ch: [0.2] * L for ch in ("bos", "system", "user", "template", "assistant")}
    att = {"channels": list(shares), "retrieval_head": {"layer": 1, "head": 2, "needle_mass": 0.5},
           "conditions": {c: {"shares": shares, "mean_shares": {k: 0.2 for k in shares}, "head_user_shares": h,
                              "retrieval_head_shares": {k: 0.2 for k in shares}}
                          for c, h in (("template", tmpl), ("no_template", none))}}
    d = tmp_path / "a"
    d.mkdir()
    (d / "attention.json").write_text(json.dumps({**att, "model": "m"}))
    out = build_report([d], tmp_path / "r.html")
    (m,) = load_results([d])
    (f,) = [f for f in findings(m) if f.kind == "attention-heads"]
    diffs = [t - n for rt, rn in zip(tmpl, none) for t, n in zip(rt, rn)]
    falls = sum(1 for x in diffs if x < 0)
    assert f.numbers["falls"] == falls and f"falls under the template in {falls} of {L * H} heads" in f.text
    k, n = falls, sum(1 for x in diffs if x != 0)
    probs = [Fraction(comb(n, i), 2 ** n) for i in range(n + 1)]
    assert f.numbers["sign_test"]["p"] == pytest.approx(float(sum(p for p in probs if p <= probs[k])))
    sp = pytest.importorskip("scipy.stats")
    assert f.numbers["wilcoxon"]["p"] == pytest.approx(sp.wilcoxon(diffs, correction=False, method="approx").pvalue)
    assert "user share per head of" in out.read_text()
