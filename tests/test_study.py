"""The study on a tiny random model: every part written, resumed without recomputation, checks up front."""

from __future__ import annotations

import json

import pytest
import torch
from test_niah_runner import tiny_model
from test_niah_unit import tiny_tokenizer

from ctxaware.cli.main import main
from ctxaware.errors import ConfigError
from ctxaware.study import StudyConfig, run_study
from ctxaware.study.attention import CHANNELS, channel_matrix, needle_tokens

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(len(tok)), tok


def _cfg(out, **kw) -> StudyConfig:
    base = dict(out=str(out), lengths="200,320", depths="0,100", max_new_tokens=3, attention_length=300,
                attention_depths="0,100", alpha=0.5, progress=False, phrasings="0")  # phrasings: test_report, test_stats
    return StudyConfig(**{**base, **kw})


def test_study_writes_every_part_and_resumes(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    run = run_study(_cfg(tmp_path), model=model, tokenizer=tok, model_name="tiny")
    assert run.niah.new_cells == 16 and {r["mode"] for r in run.niah.records} == {
        "raw+prefix", "chat+prefix", "chat+prefix+steer", "chat"}
    assert (tmp_path / "report.html").is_file() and (tmp_path / "niah" / "heatmap_comparison.png").is_file()
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["model"] == "tiny" and "ctxaware niah" in study["commands"]["niah"]
    assert "--modes raw+prefix,chat+prefix,chat+prefix+steer,chat" in study["commands"]["niah"]
    att = run.attention
    assert set(att["conditions"]) == {"template", "no_template"} and att["channels"] == list(CHANNELS)
    for cond in att["conditions"].values():
        per_layer = [sum(cond["shares"][c][i] for c in CHANNELS) for i in range(2)]
        assert per_layer == pytest.approx([1.0, 1.0])
        assert sum(cond["retrieval_head_shares"].values()) == pytest.approx(1.0)
        assert cond["shares"]["system"] == [0.0, 0.0]  # the system message is empty: no content tokens
        heads = torch.tensor(cond["head_user_shares"])  # every layer's every head (the test across heads)
        assert heads.shape == (2, 4) and bool(((heads >= 0) & (heads <= 1)).all())
        rh = att["retrieval_head"]
        assert float(heads[rh["layer"], rh["head"]]) == pytest.approx(cond["retrieval_head_shares"]["user"])
    assert att["conditions"]["no_template"]["mean_shares"]["template"] < 0.05  # raw text has no template tokens
    rh = att["retrieval_head"]
    mass = torch.tensor(att["conditions"]["template"]["needle_mass"])
    assert float(mass[rh["layer"], rh["head"]]) == pytest.approx(float(mass.max()))
    # a rerun redoes nothing: no NIH cell, no attention measurement
    import ctxaware.study.runner as runner

    monkeypatch.setattr(runner, "attention_by_role", lambda *a, **k: pytest.fail("attention measured again"))
    again = run_study(_cfg(tmp_path), model=model, tokenizer=tok, model_name="tiny")
    assert again.niah.new_cells == 0 and again.attention == run.attention


def test_needle_channel_covers_exactly_the_needle(tiny):
    from ctxaware.niah import NEEDLES, Haystack, read_haystack
    from ctxaware.niah.prompts import build_prompt

    _, tok = tiny
    needle = NEEDLES["SF"]
    hay = Haystack(read_haystack("builtin"), tok)
    for mode in ("chat+prefix", "raw+prefix"):
        r = build_prompt(tok, hay.place(needle.needle, 300, 50).text, needle, mode).rendered
        pos = needle_tokens(r, needle.needle)
        text = tok.decode([r.input_ids[i] for i in pos])
        assert needle.needle in text and len(text) < len(needle.needle) + 4
        m = channel_matrix(r, pos)
        assert torch.equal(m[:, :len(CHANNELS)].sum(1), torch.ones(len(r.input_ids)))
        assert m[0, CHANNELS.index("bos")] == 1 and all(r.roles[i] == "user" for i in pos)


def test_bad_options_fail_before_any_part(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ConfigError, match="exceed the model's window"):
        run_study(_cfg(tmp_path, lengths="200,4000"), model=model, tokenizer=tok, model_name="tiny")
    with pytest.raises(ConfigError):
        run_study(_cfg(tmp_path, heads="9"), model=model, tokenizer=tok, model_name="tiny")
    assert not (tmp_path / "niah" / "results.jsonl").exists()
    for bad in ({"qa": "squad,trivia"}, {"attention_depths": "0,150"}, {"modes": "chat,weird"}, {"qa_limit": 0}):
        with pytest.raises(ConfigError):
            _cfg(tmp_path, **bad)


def test_cli_study_one_line_error(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path), "--qa", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main(["study", "--out", str(tmp_path), "--alpha", "2"]) == 2


@pytest.mark.slow
def test_embedded_study_end_to_end(tmp_path):
    """The embedded model on a small grid: the report states the counts of its own results."""
    from ctxaware.report import load_results
    from ctxaware.report.html import findings

    run = run_study(StudyConfig(out=str(tmp_path), lengths="1000", depths="0,100", attention_length=1000,
                                attention_depths="50", progress=False))
    assert len(run.niah.records) == 8 and (tmp_path / "report.html").is_file()
    (m,) = load_results([tmp_path])
    lost = sum(1 for r in run.niah.records if r["mode"] == "chat+prefix" and r["recall"] < 1)
    text = " ".join(f.text for f in findings(m))
    assert f"(chat+prefix) the model loses the needle in {lost} of 2 cells" in text
    assert run.attention["retrieval_head"]["needle_mass"] > 0.05  # a 135M chat model does have a retrieval head


@pytest.mark.slow
def test_study_qa_through_lm_eval(tiny, tmp_path):
    """QA variants through lm-eval (slow: lm-eval's generation loop, ~3 min on a loaded 2-core machine)."""
    from test_harness import write_data

    model, tok = tiny
    data = write_data(tmp_path / "data")
    cfg = _cfg(tmp_path / "s", lengths="200", depths="0", qa="squad", qa_limit=2, data_dir=str(data))
    run = run_study(cfg, model=model, tokenizer=tok, model_name="tiny")
    assert set(run.qa) == {"chat", "raw", "chat+steer"}
    for variant, task in (("chat", "ctxaware_squad_no_ind"), ("raw", "ctxaware_squad_no_template")):
        row = run.qa[variant]["tables"][task]
        assert row["n"] == 2 and 0.0 <= row["value"] <= 1.0 and row["stderr"] is not None
    assert run.qa["chat+steer"]["settings"]["identity"]["steering"]["alpha"] == 0.5
    page = (tmp_path / "s" / "report.html").read_text()
    assert "ctxaware_squad_no_template" in page and "standard error" in page
    import ctxaware.harness.model as hm

    class Boom(hm.CtxawareLM):
        def __init__(self, *a, **k):
            raise AssertionError("QA evaluated again")

    import unittest.mock

    with unittest.mock.patch.object(hm, "CtxawareLM", Boom):
        again = run_study(cfg, model=model, tokenizer=tok, model_name="tiny")
    assert again.qa == run.qa


def test_steering_file_in_the_study_directory_is_used(tmp_path):
    from ctxaware.steering import SteeringConfig
    from ctxaware.steering.file import write_steering_file

    assert StudyConfig(out=str(tmp_path)).steering is None
    write_steering_file(tmp_path / "steering.yaml", SteeringConfig(alpha=0.6, heads="0"))
    cfg = StudyConfig(out=str(tmp_path))
    assert cfg.steering == str(tmp_path / "steering.yaml")
    from ctxaware.niah.runner import steering_config

    steer = steering_config(cfg.niah_config())
    assert (steer.alpha, steer.heads) == (0.6, "0")
