"""Calibration on tiny random models: attention ranking = brute-force eager ranking, the guard's
losses and refusals, the steering file round trip, the search's choice, and the CLI's one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from test_measure_models import brute_force_attentions, one_thread, tiny_model  # noqa: F401
from test_niah_unit import tiny_tokenizer

from ctxaware.calibrate import CalibrationConfig, Guard, calibrate, head_set, needle_positions, rank_heads
from ctxaware.calibrate.guard import instruction_set, qa_set, response_losses
from ctxaware.calibrate.heads import heads_to_spec, retrieval_scores
from ctxaware.calibrate.search import held_in_cells
from ctxaware.errors import ConfigError
from ctxaware.steering import SteeringConfig, read_steering_file, steer, write_steering_file

SMALL = dict(lengths="400,520", depths="10,60", needle="SF", max_new_tokens=3, guard_examples=3, progress=False)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model("llama", vocab=len(tok), layers=3, positions=2048), tok


@pytest.fixture(scope="module")
def cells(tiny):
    model, tok = tiny
    return held_in_cells(CalibrationConfig(**SMALL), tok)


def test_needle_positions_cover_exactly_the_needle(cells):
    rows, _, needle = cells
    for c in rows:
        r = c["prompt"]
        pos = needle_positions(r, needle.needle)
        assert pos == list(range(pos[0], pos[-1] + 1))
        text = r.text[r.offsets[pos[0]][0]:r.offsets[pos[-1]][1]]
        assert needle.needle in text and len(text) < len(needle.needle) + 8
        assert all(r.roles[i] == "user" for i in pos)


def test_retrieval_scores_and_ranking_equal_brute_force_eager(tiny, cells):
    model, _ = tiny
    rows, _, needle = cells
    prompts = [(c["prompt"], needle.needle) for c in rows]
    scores = retrieval_scores(model, prompts)
    ref = torch.zeros_like(scores)
    for rendered, text in prompts:
        att = brute_force_attentions(model, rendered.input_ids)  # per layer (H, T, T)
        pos = needle_positions(rendered, text)
        ref += torch.stack([a[:, -1, pos].sum(-1).double() for a in att])
    ref /= len(prompts)
    assert scores.shape == (3, 4)
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=0)
    assert scores.max() > 2 * scores.min()  # far from uniform: a ranking that can be wrong
    pairs = [(layer, head) for layer in range(3) for head in range(4)]
    assert rank_heads(scores) == sorted(pairs, key=lambda p: (-float(ref[p]), p))


def test_head_sets():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.8]], dtype=torch.float64)
    assert head_set(scores, "top2") == {0: [1], 1: [2]}
    assert head_set(scores, "top3") == {0: [1], 1: [0, 2]}
    assert head_set(scores, "layer1") == {0: [1], 1: [2]}
    assert head_set(scores, "layer2") == {0: [1, 2], 1: [0, 2]}
    assert head_set(scores, "all") == "all"
    assert heads_to_spec(head_set(scores, "layer2")) == "0:1,2;1:0,2"
    with pytest.raises(ConfigError, match="head set 'best3'"):
        head_set(scores, "best3")


def test_response_loss_equals_masked_label_loss(tiny):
    model, tok = tiny
    _, convs = qa_set(None, 3)
    losses = response_losses(model, tok, convs)
    from ctxaware.chat import render

    for conv, loss in zip(convs, losses):
        r = render(tok, conv)
        span = next(s for s in r.spans if s.role == "assistant")
        ids = torch.tensor([r.input_ids[:span.end]])
        labels = torch.full_like(ids, -100)
        labels[0, span.start:span.end] = ids[0, span.start:span.end]
        with torch.no_grad():
            ref = model(input_ids=ids, labels=labels).loss.item()
        assert loss == pytest.approx(ref, abs=1e-4)


def test_batched_steered_losses_equal_one_at_a_time(tiny):
    model, tok = tiny
    _, convs = instruction_set(None, 4)
    cfg = SteeringConfig(alpha=0.1, heads="0;2:1")
    together = response_losses(model, tok, convs, cfg)
    alone = [response_losses(model, tok, [c], cfg, batch_tokens=1)[0] for c in convs]
    assert together == pytest.approx(alone, abs=1e-5)
    assert together != pytest.approx(response_losses(model, tok, convs), abs=1e-4)  # steering acted


def test_share_rule_candidates_and_their_guard_losses(tiny):
    from ctxaware.calibrate.search import candidates

    model, tok = tiny
    scores = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cands = candidates(CalibrationConfig(head_sets="top2,all", alphas="0.5", shares="0.4,0.8"), scores)
    assert [c.name for c in cands] == ["unsteered", "top2@0.5", "top2@s0.4", "top2@s0.8", "all@0.5", "all@s0.4",
                                       "all@s0.8"]
    share = cands[3].config
    assert share.rule == "share" and share.share == 0.8 and share.active and cands[3].steered
    _, convs = instruction_set(None, 4)
    together = response_losses(model, tok, convs, share)
    alone = [response_losses(model, tok, [c], share, batch_tokens=1)[0] for c in convs]
    assert together == pytest.approx(alone, abs=1e-5)
    assert together != pytest.approx(response_losses(model, tok, convs), abs=1e-4)


def test_guard_refuses_configurations_that_raise_the_loss(tiny):
    model, tok = tiny
    guard = Guard(model, tok, {"instructions": instruction_set(None, 3), "qa": qa_set(None, 3)}, margin=0.0)
    identity = guard.check(SteeringConfig(alpha=1.0))
    assert identity["passed"] and abs(identity["qa"]["rise"]) < 1e-9
    reports = {}
    for heads in ("0", "1", "all"):  # on this seeded model: layer 0 raises the QA loss, layer 1 lowers both
        cfg = SteeringConfig(alpha=0.01, heads=heads)
        report = reports[heads] = guard.check(cfg)
        for name in ("instructions", "qa"):
            convs = next(gs.conversations for gs in guard.sets if gs.name == name)
            losses = response_losses(model, tok, convs, cfg)
            assert report[name]["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-9)
            assert report[name]["rise"] == pytest.approx(report[name]["loss"] - report[name]["baseline"], abs=1e-12)
        assert report["passed"] == all(report[n]["rise"] <= 0.0 for n in ("instructions", "qa"))
    assert reports["0"]["qa"]["rise"] > 1e-3 and not reports["0"]["passed"]  # raised the loss: refused
    assert reports["1"]["passed"]
    assert Guard(model, tok, {"qa": qa_set(None, 3)}, margin=0.01).check(SteeringConfig(alpha=0.01, heads="0"))["passed"]


def test_steering_file_round_trips_and_steers(tiny, cells, tmp_path):
    model, tok = tiny
    rows, _, _ = cells
    cfg = SteeringConfig(alpha=0.2, heads="0:1,3;2:0")
    meta = {"model": "tiny", "search": [{"candidate": "x", "alpha": 0.2}], "guard": {"margin_nats": 0.05}}
    path = write_steering_file(tmp_path / "steering.yaml", cfg, meta)
    loaded, loaded_meta = read_steering_file(path)
    assert loaded == cfg and loaded_meta == meta
    r = rows[0]["prompt"]
    ids = torch.tensor([r.input_ids])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steer(model, cfg, r):
            direct = model(input_ids=ids).logits
        with steer(model, loaded, r):
            from_file = model(input_ids=ids).logits
    torch.testing.assert_close(from_file, direct, atol=0, rtol=0)
    assert (from_file - plain).abs().max() > 1e-4


def test_calibrate_writes_file_table_and_never_picks_a_guard_failure(tiny, tmp_path):
    model, tok = tiny
    cfg = CalibrationConfig(out=str(tmp_path / "cal"), head_sets="top3,layer1,all", alphas="0.05,0.7", margin=0.0,
                            plot=False, select_by="needle_loss", **SMALL)
    result = calibrate(cfg, model=model, tokenizer=tok, model_name="tiny")
    cands = result["candidates"]
    assert [c.name for c in cands] == ["unsteered", "top3@0.05", "top3@0.7", "layer1@0.05", "layer1@0.7",
                                       "all@0.05", "all@0.7"]
    assert cands[1].n_heads == 3 and cands[3].n_heads == 3 and cands[5].n_heads == 12
    for c in cands[1:]:
        assert (c.needle_loss is not None) == bool(c.guard["passed"])  # refused candidates are never scored
    config, meta = read_steering_file(tmp_path / "cal" / "steering.yaml")
    assert config == result["steering"]
    chosen = next(c for c in cands if c.name == meta["chosen"])
    assert chosen.alpha == 1.0 or chosen.guard["passed"]
    assert chosen.key("needle_loss") >= cands[0].key("needle_loss")
    assert chosen.recall is not None and cands[0].recall is not None  # recall of baseline and winner
    passing = [c for c in cands[1:] if c.guard["passed"]]
    if passing and min(c.needle_loss for c in passing) < cands[0].needle_loss:
        assert chosen.needle_loss == min(c.needle_loss for c in passing)
    if chosen.alpha < 1:
        assert config.alpha == chosen.alpha and config.heads == heads_to_spec(chosen.heads)
    assert meta["held_in"]["lengths"] == [400, 520] and len(meta["search"]) == len(cands)
    assert meta["guard"]["sets"]["qa"]["examples"] == 3
    with open(tmp_path / "cal" / "search.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["candidate"] for r in table] == [c.name for c in cands]
    data = json.loads((tmp_path / "cal" / "search.json").read_text())
    assert len(data["head_scores"]) == 3 and len(data["head_scores"][0]) == 4
    # per held-in cell outcomes of baseline and winner, and the report's paired test on them
    from ctxaware.niah.needles import load_needle
    from ctxaware.niah.scoring import recall
    from ctxaware.report import load_results
    from ctxaware.report.html import findings
    from ctxaware.stats import binom_test_half

    rows = {r["candidate"]: r for r in data["rows"]}
    for c in (cands[0], chosen):
        assert rows[c.name]["heldin_found"] == [int(recall(a, load_needle("SF").keywords) >= 1) for a in c.answers]
    if chosen is not cands[0]:
        (m,) = load_results([tmp_path / "cal"])
        (f,) = [f for f in findings(m) if f.kind == "calibration"]
        a, b = rows[chosen.name]["heldin_found"], rows["unsteered"]["heldin_found"]
        up, down = sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))
        assert f.numbers["test"]["p"] == pytest.approx(binom_test_half(up, up + down))


def test_choose_by_recall_prefers_recall_then_loss_then_gentler_steering():
    from ctxaware.calibrate.search import Candidate, choose

    def cand(name, alpha, recall, loss, passed=True):
        c = Candidate(name, "all", alpha, "all", 4, guard={"passed": passed}, recall=recall, needle_loss=loss)
        return c

    base = cand("unsteered", 1.0, 0.5, 2.0)
    a, b = cand("a", 0.3, 0.75, 1.9), cand("b", 0.6, 0.75, 1.9)
    refused = cand("c", 0.1, 1.0, 1.0, passed=False)
    assert choose([base, a, b, refused], "recall")[0] is b  # tie on both scores: gentler alpha
    assert choose([base, cand("d", 0.5, 0.5, 2.5)], "recall")[0] is base  # nothing beats the baseline
    assert choose([base, cand("e", 0.5, 0.25, 1.5)], "needle_loss")[0].name == "e"
    assert choose([base, cand("e", 0.5, 0.25, 1.5)], "recall")[0] is base


def test_config_errors():
    with pytest.raises(ConfigError, match="alphas"):
        CalibrationConfig(alphas="0.5,1.0")
    with pytest.raises(ConfigError, match="head set"):
        CalibrationConfig(head_sets="top0")
    with pytest.raises(ConfigError, match="depths"):
        CalibrationConfig(depths="120")


def _cli(argv, capsys):
    from ctxaware.cli.main import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_unwritable_out_dir_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _cli(["calibrate", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "not writable" in err and "--out" in err


def test_cli_bad_model_dir_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    code, err = _cli(["calibrate", "--model", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "not-a-model" in err


def test_cli_bad_option_is_one_line_error(tmp_path, capsys):
    code, err = _cli(["calibrate", "--alphas", "0.5,abc", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "alphas" in err


def test_judge_compares_chat_all_heads_and_the_file(tiny, tmp_path):
    from ctxaware.calibrate.judge import JudgeConfig, judge

    model, tok = tiny
    model_dir = tmp_path / "model"
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    squad = tmp_path / "squad.jsonl"
    rows = [{"id": str(i), "title": "t", "context": f"The river Vell is {i} kilometres long. It ends at Brenn.",
             "question": "How long is the Vell?", "answers": {"text": [f"{i} kilometres"], "answer_start": [16]}}
            for i in range(3)]
    squad.write_text("\n".join(json.dumps(r) for r in rows))
    drop = tmp_path / "drop.jsonl"
    drop.write_text("\n".join(json.dumps({"line": i, "passage": f"Brenn had {i} mills and {i + 2} bridges.",
                                          "question": "How many bridges did Brenn have?", "answers": [str(i + 2)]})
                              for i in range(4)))
    path = write_steering_file(tmp_path / "steering.yaml", SteeringConfig(alpha=0.3, heads="1:0,2"),
                               {"model": str(model_dir), "guard": {"margin_nats": 0.05}})
    result = judge(JudgeConfig(steering=str(path), out=str(tmp_path / "judge"), lengths="400", depths="0,50",
                               qa=str(squad), qa_examples=3, guard_examples=2, max_new_tokens=3, progress=False,
                               drop=str(drop), drop_examples=3))
    table = result["table"]
    assert list(table) == ["chat", "chat+all@0.9", "chat+file"]
    for row in table.values():
        assert row["niah_cells"] == 2 and row["squad_n"] == 3 and 0 <= row["squad_contains"] <= 1
        assert row["drop_n"] == 3 and 0 <= row["drop_contains"] <= 1
    assert table["chat"]["guard_qa_rise"] == 0.0 and table["chat"]["guard_passed"]
    assert table["chat+file"]["guard_qa_rise"] != table["chat+all@0.9"]["guard_qa_rise"]
    files = {r["alpha"] for r in read_records_of(tmp_path / "judge" / "niah-file")}
    assert files == {0.3}
    md = (tmp_path / "judge" / "judge.md").read_text()
    assert md.count("\n") == 5 and "DROP contains" in md and "(n=3)" in md.splitlines()[2]


def read_records_of(directory):
    from ctxaware.niah import read_records

    return read_records(directory)


def test_rerun_resumes_every_step_from_the_cache_and_settings_changes_miss(tiny, tmp_path, monkeypatch):
    import ctxaware.calibrate.guard as guard_mod
    import ctxaware.calibrate.search as search

    model, tok = tiny
    cfg = dict(out=str(tmp_path / "cal"), head_sets="top3,all", alphas="0.5", shares="0.5", plot=False, **SMALL)
    first = calibrate(CalibrationConfig(**cfg), model=model, tokenizer=tok, model_name="tiny")
    assert first["meta"]["resumed_steps"] == 0
    assert len(list((tmp_path / "cal" / "cache").glob("guard-*.json"))) == 5

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished step was recomputed")

    with monkeypatch.context() as m:  # nothing may be recomputed: every model-running step is blocked
        for mod, name in ((search, "retrieval_scores"), (search, "_needle_loss"), (search, "_answer"),
                          (search, "response_losses"), (guard_mod, "response_losses"),
                          (guard_mod, "losses_of_rendered")):
            m.setattr(mod, name, forbidden)
        second = calibrate(CalibrationConfig(**cfg), model=model, tokenizer=tok, model_name="tiny")
    assert second["meta"]["resumed_steps"] > 0
    assert second["meta"]["search"] == first["meta"]["search"]
    assert second["steering"] == first["steering"]
    assert [c.answers for c in second["candidates"]] == [c.answers for c in first["candidates"]]
    torch.testing.assert_close(second["scores"], first["scores"], atol=0, rtol=0)
    # another margin reuses the losses (blocked again) and redoes only the verdicts
    with monkeypatch.context() as m:
        m.setattr(guard_mod, "losses_of_rendered", forbidden)
        m.setattr(search, "_needle_loss", forbidden)
        strict = calibrate(CalibrationConfig(**{**cfg, "margin": 0.0}), model=model, tokenizer=tok, model_name="tiny")
    for c in strict["candidates"]:
        assert c.guard["margin"] == 0.0
        assert c.guard["passed"] == all(c.guard[n]["rise"] <= 0.0 for n in ("instructions", "qa"))
    # another held-in depth must not reuse held-in numbers (the guard's still apply)
    third = calibrate(CalibrationConfig(**{**cfg, "depths": "20"}), model=model, tokenizer=tok, model_name="tiny")
    assert third["meta"]["held_in"]["depths"] == [20.0]
    assert not torch.equal(third["scores"], first["scores"])
    fresh = calibrate(CalibrationConfig(**cfg, resume=False), model=model, tokenizer=tok, model_name="tiny")
    assert fresh["meta"]["resumed_steps"] == 0 and fresh["meta"]["search"] == first["meta"]["search"]


def test_select_by_recall_answers_the_lowest_loss_shortlist_and_picks_by_perfect_cells(tiny, tmp_path):
    model, tok = tiny
    cfg = CalibrationConfig(out=str(tmp_path / "cal"), head_sets="top3,all", alphas="0.05,0.5,0.9", margin=10.0,
                            plot=False, select_by="recall", recall_top=2, **SMALL)
    result = calibrate(cfg, model=model, tokenizer=tok, model_name="tiny")
    cands, meta = result["candidates"], result["meta"]
    steered = cands[1:]
    assert all(c.guard["passed"] and c.needle_loss is not None for c in steered)  # margin 10: all pass
    answered = [c for c in steered if c.recall is not None]
    best_two = sorted(steered, key=lambda c: c.needle_loss)[:2]
    assert sorted(c.name for c in answered) == sorted(c.name for c in best_two)
    assert cands[0].recall is not None and len(cands[0].answers) == 4
    chosen = next(c for c in cands if c.name == meta["chosen"])
    top = max([cands[0]] + answered, key=lambda c: c.key("recall"))
    assert chosen.key("recall") == top.key("recall")
    if chosen is not cands[0]:
        assert chosen.key("recall") > cands[0].key("recall")
    perfect = [c.cells_perfect for c in [cands[0]] + answered]
    assert chosen.cells_perfect == max(perfect)
    lost = meta["held_in"]["lost_by_unsteered"]
    assert len(lost) == 4 - cands[0].cells_perfect and meta["recall_top"] == 2


def test_recall_key_orders_perfect_cells_before_mean_recall_before_loss():
    from ctxaware.calibrate.search import Candidate, recall_shortlist

    def cand(name, perfect, rec, loss, alpha=0.5):
        return Candidate(name, "all", alpha, "all", 4, guard={"passed": True}, recall=rec, cells_perfect=perfect,
                         needle_loss=loss)

    a, b, c = cand("a", 2, 0.6, 0.9), cand("b", 1, 0.9, 0.1), cand("c", 2, 0.6, 0.5)
    assert max([a, b, c], key=lambda x: x.key("recall")) is c
    assert [x.name for x in recall_shortlist([a, b, c], 2)] == ["b", "c"]  # search order kept
    assert [x.name for x in recall_shortlist([a, b, c], 0)] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="recall_top"):
        CalibrationConfig(recall_top=-1)
