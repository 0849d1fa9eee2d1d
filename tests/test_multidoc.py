"""Multi-document QA: prompts (distractors, positions, phrasings, document spans), runs on a tiny model
(resume, shards, scores recomputed from the records), the report's findings, and the shared SQuAD data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_niah_runner import tiny_model
from test_niah_unit import tiny_tokenizer

from ctxaware.errors import ConfigError, InputError
from ctxaware.harness.qa import normalize_answer
from ctxaware.multidoc import MultidocConfig, run_multidoc
from ctxaware.multidoc.prompts import (INSTRUCTIONS, build_user, distractors, load_questions, paragraphs,
                                       render_prompt, select)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"
WORDS = "river stone lamp orchard violin copper harbor meadow lantern quartz falcon ember glacier tulip".split()


def write_squad(path: Path, articles: int = 6, paragraphs_per: int = 2, seed: int = 0) -> Path:
    """A small SQuAD v1.1 JSON file: each paragraph states one fact about a made-up thing, asked by two questions."""
    rng = random.Random(seed)
    data = []
    for a in range(articles):
        paras = []
        for p in range(paragraphs_per):
            thing, value = f"item{a}x{p}", f"{rng.choice(WORDS)}{a}{p}"
            filler = " ".join(rng.choice(WORDS) for _ in range(30))
            context = f"{filler}. The code word of the {thing} is {value}. {filler}."
            qas = [{"id": f"q{a}-{p}-{j}", "question": q, "answers": [{"text": value, "answer_start": context.find(value)}]}
                   for j, q in enumerate([f"What is the code word of the {thing}?", f"Which code word has the {thing}?"])]
            paras.append({"context": context, "qas": qas})
        data.append({"title": f"Article_{a}", "paragraphs": paras})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(len(tok)).to(torch.float64), tok


def test_distractors_seeded_other_articles_without_answer(tmp_path):
    qs = load_questions(str(write_squad(tmp_path / "s.json")))
    pool = paragraphs(qs)
    chosen = select(qs, 12)
    assert len({q.passage for q in chosen}) == 12  # one question per paragraph first
    for q in chosen:
        d = distractors(q, pool, 4, seed=0)
        assert d == distractors(q, pool, 4, seed=0) and d != distractors(q, pool, 4, seed=1)
        assert all(t != q.title for t, _ in d)
        assert not any(normalize_answer(a) in normalize_answer(p) for _, p in d for a in q.answers)
    with pytest.raises(InputError, match="distractors needed"):
        distractors(chosen[0], pool, 11, seed=0)


def test_gold_moves_distractors_keep_order_and_phrasings_differ(tmp_path, tiny):
    _, tok = tiny
    qs = load_questions(str(write_squad(tmp_path / "s.json")))
    q = qs[0]
    others = distractors(q, paragraphs(qs), 3, seed=0)
    texts = [build_user(q, others, p, 0).user for p in range(4)]
    for p, text in enumerate(texts):
        docs = text.split("\n\n")[1:-1]
        assert len(docs) == 4 and q.answers[0] in docs[p]
        assert [d.split(") ", 1)[1] for i, d in enumerate(docs) if i != p] == [" ".join(o[1].split()) for o in others]
    phr = {build_user(q, others, 1, i).user.split("\n\n")[0] for i in range(len(INSTRUCTIONS))}
    assert len(phr) == len(INSTRUCTIONS) >= 3
    built = build_user(q, others, 2, 0)
    whole = render_prompt(tok, built, "chat+prefix+steer")
    docs = render_prompt(tok, built, "chat+prefix+steer-docs")
    assert whole.input_ids == docs.input_ids
    u_whole = next(s for s in whole.spans if s.role == "user")
    u_docs = next(s for s in docs.spans if s.role == "user")
    assert u_whole.start < u_docs.start < u_docs.end < u_whole.end
    text = tok.decode(docs.input_ids[u_docs.start:u_docs.end])
    assert text.lstrip().startswith("Document [1]") and "Question:" not in text and "Write" not in text
    # the engine's steering follows the narrowed span: the next-token logits differ from whole-turn steering
    from ctxaware.steering import SteeringConfig, steer

    model = tiny[0]
    ids = torch.tensor([whole.input_ids])
    with torch.no_grad():
        with steer(model, SteeringConfig(alpha=0.3), whole):
            a = model(ids).logits[0, -1]
        with steer(model, SteeringConfig(alpha=0.3), docs):
            b = model(ids).logits[0, -1]
    assert (a - b).abs().max() > 1e-4
    raw_docs = render_prompt(tok, built, "raw+prefix+steer-docs")
    assert tok.decode(raw_docs.input_ids[raw_docs.spans[0].start:raw_docs.spans[0].end]).startswith("Document [1]")


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown flag"):
        MultidocConfig(modes="chat+docs")
    with pytest.raises(ConfigError, match="positions"):
        MultidocConfig(k="2", positions="0,3")
    with pytest.raises(ConfigError, match="phrasings"):
        MultidocConfig(phrasings="7")
    assert MultidocConfig(phrasings="all").phrasings == [0, 1, 2]


def _cfg(tmp_path, data, **kw):
    base = dict(data=str(data), out=str(tmp_path / "out"), questions=3, k="1", modes="raw+prefix,chat+prefix,"
                "chat+prefix+steer,chat+prefix+steer-docs", max_new_tokens=4, progress=False, plot=False, alpha=0.02,
                max_words=20)
    return MultidocConfig(**{**base, **kw})


def test_run_resume_shards_and_scores_recomputed(tmp_path, tiny):
    model, tok = tiny
    data = write_squad(tmp_path / "s.json")
    full = run_multidoc(_cfg(tmp_path, data), model=model, tokenizer=tok, model_name="tiny")
    assert full.new == 3 * 2 * 4 and len(full.records) == 24
    lines = [json.loads(x) for x in (full.out / "results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in lines] == [r["key"] for r in full.records]
    for r in lines:  # scores recomputed independently from the record's answer
        short = r["answer"].strip().split("\n")[0]
        short = short[: short.find(". ") + 1] if ". " in short else short
        assert r["short_answer"] == short.strip()
        gold = [g.lower() for g in r["gold"]]
        assert r["contains"] == float(any(g in r["short_answer"].lower() for g in gold))
        assert r["truncated"] == (r["answer_tokens"] == 4)
    # per (mode, position) accuracy of the summary = the mean over the records
    summary = json.loads((full.out / "summary.json").read_text())
    for row in summary["by_position"]:
        mine = [r for r in lines if r["mode"] == row["mode"] and r["position"] == row["position"]]
        assert row["n"] == len(mine) == 3 and row["contains"] == pytest.approx(sum(r["contains"] for r in mine) / 3)
    # steering changes answers (documents-only emphasis: its effect on logits is checked above)
    by = {(r["mode"], r["question_id"], r["position"]): r["answer"] for r in lines}
    plain = [k for k in by if k[0] == "chat+prefix"]
    assert any(by[k] != by[("chat+prefix+steer",) + k[1:]] for k in plain)
    # resume: nothing new; shards: the same records
    assert run_multidoc(_cfg(tmp_path, data), model=model, tokenizer=tok, model_name="tiny").new == 0
    out2 = tmp_path / "sharded"
    for i in range(2):
        run_multidoc(_cfg(tmp_path, data, out=str(out2), shard=f"{i}/2"), model=model, tokenizer=tok, model_name="tiny")
    merged = run_multidoc(_cfg(tmp_path, data, out=str(out2)), model=model, tokenizer=tok, model_name="tiny")
    assert merged.new == 0
    strip = lambda rs: [{k: v for k, v in r.items()} for r in rs]  # noqa: E731
    assert strip(merged.records) == strip(full.records)
    # the report reads a multidoc directory: its table, chart and findings (not mistaken for NIH cells)
    from ctxaware.report import build_report, load_results
    from ctxaware.report.html import findings

    page = build_report([full.out], tmp_path / "r.html").read_text()
    assert "Multi-document QA by gold position" in page and "accuracy by gold position of tiny" in page
    (m,) = load_results([full.out])
    assert not m.niah and len(m.multidoc) == 24
    kinds = {f.kind for f in findings(m)}
    assert {"multidoc-curve", "multidoc-template", "multidoc-steering", "multidoc-docs-vs-turn"} <= kinds


def test_report_findings_recomputed(tmp_path):
    """The findings' tests over synthetic records: McNemar p by brute force, accuracy per position by counting."""
    from fractions import Fraction
    from math import comb

    from ctxaware.report.multidoc import multidoc_findings

    rng = random.Random(1)
    recs = []
    for q in range(30):
        for p in range(5):
            for mode, base in (("raw+prefix", 0.7), ("chat+prefix", 0.5), ("chat+prefix+steer", 0.55)):
                acc = base - (0.25 if 0 < p < 4 and mode == "chat+prefix" else 0)
                ok = float(rng.random() < acc)
                recs.append({"mode": mode, "question_id": f"q{q}", "k": 4, "position": p, "phrasing": 0,
                             "contains": ok, "exact_match": ok, "f1": ok, "truncated": False, "answer_tokens": 3})
    found = {f.kind: f for f in multidoc_findings(recs)}
    t = found["multidoc-template"]
    a = {(r["question_id"], r["position"]): r["contains"] for r in recs if r["mode"] == "raw+prefix"}
    b = {(r["question_id"], r["position"]): r["contains"] for r in recs if r["mode"] == "chat+prefix"}
    up = sum(1 for k in a if a[k] and not b[k])
    down = sum(1 for k in a if b[k] and not a[k])
    probs = [Fraction(comb(up + down, i), 2 ** (up + down)) for i in range(up + down + 1)]
    p = float(sum(x for x in probs if x <= probs[up]))
    assert t.numbers["test"]["p"] == pytest.approx(p)
    assert t.numbers["test"]["effect"] == pytest.approx((sum(a.values()) - sum(b.values())) / len(a))
    curve = found["multidoc-curve"]
    for mode in ("raw+prefix", "chat+prefix"):
        counted = [sum(r["contains"] for r in recs if r["mode"] == mode and r["position"] == pos) / 30 for pos in range(5)]
        assert curve.numbers["curves"][mode] == pytest.approx(counted)
    assert "multidoc-steering" in found


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared SQuAD data absent")
def test_shared_squad_builds_prompts():
    qs = load_questions(str(SHARED / "xquad.en.json"))
    rows = load_questions(str(SHARED / "squad_v1.1_dev_xquad_subset.jsonl"))
    assert len(qs) == len(rows) == 1190 and {q.id for q in qs} == {q.id for q in rows}
    pool = paragraphs(qs)
    for q in select(qs, 40):
        for t, p in distractors(q, pool, 6, seed=0):
            assert t != q.title and not any(normalize_answer(a) in normalize_answer(p) for a in q.answers)


def test_squad_metrics_by_hand():
    from ctxaware.harness.qa import exact_match, f1

    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert exact_match("Denver Broncos.", ["the Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Denver Broncos"]) == 0.0
    # pred {denver, broncos, won} vs gold {denver, broncos}: precision 2/3, recall 1 -> F1 0.8
    assert f1("the Denver Broncos won", ["Denver Broncos", "Carolina"]) == pytest.approx(0.8)
    assert f1("nothing", ["Denver Broncos"]) == 0.0


def test_study_runs_multidoc_part(tmp_path, tiny):
    """``ctxaware study --multidoc DATA``: DIR/multidoc with the study's modes and steering, in study.json's commands
    and read back by the report with the study."""
    from ctxaware.report import load_results
    from ctxaware.study import StudyConfig, run_study

    model, tok = tiny
    data = write_squad(tmp_path / "s.json")
    cfg = StudyConfig(out=str(tmp_path / "st"), lengths="200", depths="50", max_new_tokens=2, attention_length=200,
                      attention_depths="50", alpha=0.5, progress=False, phrasings="0", multidoc=str(data),
                      multidoc_questions=2, multidoc_k="1", report=False)
    assert cfg.multidoc_config().alpha == 0.5 and "chat+prefix+steer-docs" in cfg.multidoc_config().modes
    run_study(cfg, model=model, tokenizer=tok, model_name="tiny")
    recs = [json.loads(x) for x in (tmp_path / "st" / "multidoc" / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 2 * 5 and {r["mode"] for r in recs} == set(cfg.multidoc_config().modes)
    study = json.loads((tmp_path / "st" / "study.json").read_text())
    assert "ctxaware multidoc" in study["commands"]["multidoc"] and "--k 1" in study["commands"]["multidoc"]
    (m,) = load_results([tmp_path / "st"])
    assert len(m.multidoc) == 20 and m.niah


def test_report_shows_the_last_plan_only(tmp_path, tiny):
    """A directory that kept answers of an earlier, larger plan: the report shows the last run's plan."""
    from ctxaware.report import load_results

    model, tok = tiny
    data = write_squad(tmp_path / "s.json")
    base = dict(data=str(data), out=str(tmp_path / "o"), questions=2, k="1", modes="raw+prefix", max_new_tokens=2,
                progress=False, plot=False, max_words=20)
    run_multidoc(MultidocConfig(**base), model=model, tokenizer=tok, model_name="tiny")
    small = run_multidoc(MultidocConfig(**{**base, "positions": "0"}), model=model, tokenizer=tok, model_name="tiny")
    assert small.new == 0 and len(small.records) == 2
    assert len((tmp_path / "o" / "results.jsonl").read_text().splitlines()) == 4  # kept, for a later rerun
    (m,) = load_results([tmp_path / "o"])
    assert len(m.multidoc) == 2 and {r["position"] for r in m.multidoc} == {0}
