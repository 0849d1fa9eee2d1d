"""MT-Bench (``ctxaware mtbench``): data and judge prompts, the judge client's retries, resumable runs.

The judge is a fake OpenAI-compatible server on 127.0.0.1 (:mod:`mtbench_judge`) whose rating is a
known function of each answer, with faults injected; answers come from a tiny random Llama
(4 new tokens). Summaries are checked against scores recomputed independently from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mtbench_judge import QUESTIONS, FakeJudge, expected_summary, rating, write_data
from test_measure_models import tiny_model
from test_niah_unit import tiny_tokenizer

from ctxaware.errors import ConfigError, InputError, InputFileNotFoundError
from ctxaware.mtbench import JudgeClient, JudgeError, MtBenchConfig, parse_rating, read_mtbench, run_mtbench
from ctxaware.mtbench.data import judge_messages, load_data, read_questions, select

pytest.importorskip("httpx")
SHARED_MT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench"
needs_shared = pytest.mark.skipif(not SHARED_MT.is_dir(), reason=f"shared data not available ({SHARED_MT})")


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    return tiny_model("llama", vocab=len(tok), layers=2), tok


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "data")


def _config(data, out, judge, **kw):
    kw.setdefault("judge_retries", 3)
    return MtBenchConfig(data_dir=str(data), out=str(out), judge_base_url=judge.base_url, judge_model="fake-judge",
                         max_new_tokens=4, judge_backoff=0.0, judge_timeout=kw.pop("judge_timeout", 10.0),
                         progress=False, **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- data -----------------------------------------------------------------------------------------

def test_rating_parse_follows_fastchat_and_refuses_out_of_range():
    assert parse_rating("Good. Rating: [[7]]") == 7.0
    assert parse_rating("[[8.5]] then [[2]]") == 8.5
    assert parse_rating("Rating: [6]") == 6.0  # FastChat's backup pattern
    for reply in ("no rating here", "[[0]]", "[[11]]", "", None):
        assert parse_rating(reply) is None


def test_select_takes_one_question_per_category_in_turn(data):
    qs = load_data(data).questions
    assert [q.question_id for q in select(qs, 2)] == [1, 2]
    assert [q.category for q in select(qs, 4)] == ["writing", "math", "coding", "roleplay"]
    assert select(qs, None) == qs and select(qs, 99) == qs


def test_judge_prompt_per_category_and_turn_with_references(data):
    d = load_data(data)
    q = {x.question_id: x for x in d.questions}
    name, msgs = judge_messages(q[1], ["a1", "a2"], 1, d.prompts)
    assert name == "single-v1" and msgs[0] == {"role": "system", "content": "Judge."}
    assert "<<Q1>>Write a haiku about rain.<</Q1>>" in msgs[1]["content"] and "<<A1>>a1<</A1>>" in msgs[1]["content"]
    name, msgs = judge_messages(q[2], ["a1", "a2"], 2, d.prompts)  # math: inline reference of the question
    assert name == "single-math-v1-multi-turn"
    assert "<<R1>>2 + 3 = 5.<</R1>><<R2>>5 x 4 = 20.<</R2>>" in msgs[1]["content"] and "<<A2>>a2<</A2>>" in msgs[1]["content"]
    name, msgs = judge_messages(q[3], ["a1", "a2"], 1, d.prompts)  # coding: reference_answer/gpt-4.jsonl
    assert name == "single-math-v1" and "<<R1>>Use xs[::-1].<</R1>>" in msgs[1]["content"]


@pytest.mark.parametrize("content, needle", [
    ("", "no rows"), ("{not json\n", "not valid JSON"), ('{"question_id": 1}\n', "'category'"),
    ('{"question_id": 1, "category": "writing", "turns": ["only one"]}\n', "two non-empty strings"),
    ('{"question_id": 1, "category": "math", "turns": ["a", "b"]}\n', "no reference answer"),
    ('[1, 2]\n', "JSON object"),
])
def test_bad_questions_files_are_one_line_errors(tmp_path, content, needle):
    p = tmp_path / "q.jsonl"
    p.write_text(content)
    with pytest.raises(InputError, match=needle):
        read_questions(p)


@needs_shared
def test_shared_data_reads_with_fastchat_prompts():
    d = load_data(SHARED_MT)
    assert len(d.questions) == 80 and {q.category for q in d.questions} >= {"writing", "math", "coding"}
    assert all(q.reference and len(q.reference) == 2 for q in d.questions if q.needs_reference)
    math = next(q for q in d.questions if q.category == "math")
    name, msgs = judge_messages(math, ["A", "B"], 2, d.prompts)
    assert name == "single-math-v1-multi-turn" and math.reference[1] in msgs[1]["content"]
    assert msgs[1]["content"].count("### Assistant A:\n") == 2 and '"[[rating]]"' in msgs[0]["content"]


def test_config_validation_names_the_value(tmp_path):
    with pytest.raises(ConfigError, match="limit"):
        MtBenchConfig(limit=0)
    with pytest.raises(ConfigError, match="alpha"):
        MtBenchConfig(alpha=1.5)
    with pytest.raises(InputFileNotFoundError, match="questions"):
        MtBenchConfig(questions=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="--judge-base-url"):
        run_mtbench(MtBenchConfig(out=str(tmp_path / "o")))


# --- the judge client -----------------------------------------------------------------------------

def test_judge_client_retries_http_errors_timeouts_and_missing_ratings():
    faults = {(1, 1): ["500", "429"], (2, 1): ["timeout"], (3, 1): ["norating"], (4, 1): ["norating"] * 9}
    with FakeJudge(faults, timeout_sleep=1.0) as judge, \
            JudgeClient(judge.base_url, "fake-judge", retries=3, timeout=0.4, backoff=0.0) as client:
        assert client.check() == "fake-judge"
        out = {}
        for q in QUESTIONS:
            msgs = [{"role": "user", "content": f"<<Q1>>{q['turns'][0]}<</Q1>>\n<<A1>>answer {q['question_id']}<</A1>>"}]
            out[q["question_id"]] = client.judge(msgs)
    assert [out[i].tries for i in (1, 2, 3, 4)] == [3, 2, 2, 4]
    for i in (1, 2, 3):
        assert out[i].score == rating(f"answer {i}") and out[i].error is None
    assert out[4].score is None and out[4].reply == "The answer is fine." and "rating" in out[4].error
    assert judge.requests[(4, 1)] == 4 and judge.requests[(1, 1)] == 3


def test_judge_client_fails_fast_when_unreachable_or_refused():
    with pytest.raises(JudgeError, match="unreachable"):
        JudgeClient("http://127.0.0.1:9/v1", "m").check()
    with FakeJudge() as judge:
        with JudgeClient(judge.base_url, None) as client:
            assert client.check() == "fake-judge"  # the endpoint's only model
        judge.models_sleep = 1.0  # a slow /models is not an unreachable judge, when the model is named
        with JudgeClient(judge.base_url, "named", timeout=0.2) as client:
            assert client.check() == "named"
        with JudgeClient(judge.base_url, None, timeout=0.2) as client, pytest.raises(JudgeError, match="--judge-model"):
            client.check()


# --- runs -----------------------------------------------------------------------------------------

def test_run_with_faults_summary_equals_independent_mean(tiny, data, tmp_path):
    model, tok = tiny
    faults = {(1, 1): ["500", "429"], (2, 2): ["timeout"], (3, 1): ["norating"], (4, 2): ["norating"] * 20}
    out = tmp_path / "run"
    with FakeJudge(faults, timeout_sleep=1.5) as judge:
        run = run_mtbench(_config(data, out, judge, judge_timeout=0.5, judge_concurrency=3), model=model,
                          tokenizer=tok, model_name="tiny")
    answers, judgments = _lines(out / "answers.jsonl"), _lines(out / "judgments.jsonl")
    assert [a["question_id"] for a in answers] == [1, 2, 3, 4]
    assert all(len(a["turns"]) == 2 and a["condition"] == "chat+dtype=float32" and a["model"] == "tiny" for a in answers)
    assert len(judgments) == 8 and len({(j["question_id"], j["turn"]) for j in judgments}) == 8
    bad = [j for j in judgments if j["score"] is None]
    assert [(j["question_id"], j["turn"]) for j in bad] == [(4, 2)] and bad[0]["tries"] == 4
    assert judge.requests[(4, 2)] == 4 and judge.requests[(1, 1)] == 3 and judge.requests[(2, 2)] == 2
    want = expected_summary(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score"] == pytest.approx(want["score"]) and summary["turns"] == pytest.approx(want["turns"])
    assert summary["judged"] == 7 and summary["unjudged"] == 1 and summary == run.summary
    assert summary["categories"]["roleplay"] == rating(answers[3]["turns"][0])  # its turn 2 is unjudged, not 0
    assert read_mtbench(out)["runs"][0] == {k: v for k, v in summary.items() if k not in ("all", "data")}
    # the judge saw the math reference answers and the model's own two answers
    seen = [b["messages"][1]["content"] for b in judge.seen if "<<R2>>" in b["messages"][-1]["content"]]
    assert {s.split("<<R2>>")[1].split("<</R2>>")[0] for s in seen} == {"5 x 4 = 20.", "Use xs.reverse()."}
    assert all(answers[1]["turns"][1] in s for s in seen if "5 x 4" in s)
    assert all(b["temperature"] == 0 and b["model"] == "fake-judge" for b in judge.seen)


def test_interrupted_run_resumes_without_judging_any_turn_twice(tiny, data, tmp_path, monkeypatch):
    model, tok = tiny
    out = tmp_path / "run"
    calls = {"n": 0}
    original = JudgeClient.judge

    def flaky(self, messages):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected failure after 3 judgments")
        return original(self, messages)

    with FakeJudge() as judge:
        monkeypatch.setattr(JudgeClient, "judge", flaky)
        with pytest.raises(RuntimeError, match="injected"):
            run_mtbench(_config(data, out, judge, judge_concurrency=1), model=model, tokenizer=tok, model_name="tiny")
        assert len(_lines(out / "judgments.jsonl")) == 3 and sum(judge.rated.values()) == 3
        with open(out / "judgments.jsonl", "a") as fh:  # a record torn by a kill
            fh.write('{"question_id": 4, "tu')
        monkeypatch.setattr(JudgeClient, "judge", original)
        before = (out / "answers.jsonl").read_text()
        run = run_mtbench(_config(data, out, judge), model=model, tokenizer=tok, model_name="tiny")
        assert (out / "answers.jsonl").read_text() == before  # answers are not generated again
        assert set(judge.rated) == {(q["question_id"], t) for q in QUESTIONS for t in (1, 2)}
        assert all(n == 1 for n in judge.rated.values()) and all(n == 1 for n in judge.requests.values())
        judgments = _lines(out / "judgments.jsonl")
        assert len(judgments) == 8 and run.summary["judged"] == 8
        assert run.summary["score"] == pytest.approx(expected_summary(out)["score"])
        n = sum(judge.requests.values())
        run_mtbench(_config(data, out, judge), model=model, tokenizer=tok, model_name="tiny")
        assert sum(judge.requests.values()) == n  # nothing left to judge


def test_conditions_share_a_directory_and_unjudged_turns_rejudge_on_request(tiny, data, tmp_path):
    model, tok = tiny
    out = tmp_path / "run"
    with FakeJudge({(1, 1): ["norating"] * 2}) as judge:
        plain = run_mtbench(_config(data, out, judge, limit=2, judge_retries=1), model=model, tokenizer=tok,
                            model_name="tiny")
        assert plain.summary["unjudged"] == 1
        ind = run_mtbench(_config(data, out, judge, limit=2, indicator=True, alpha=0.5, heads="0"), model=model,
                          tokenizer=tok, model_name="tiny")
        assert ind.summary["condition"] == "chat+ind+steer(alpha=0.5,heads=0)+dtype=float32" and ind.summary["unjudged"] == 0
        prompts = [b["messages"][1]["content"] for b in judge.seen]
        assert not any("[IND]" in p.split("<<A")[0] for p in prompts)  # the judge sees the plain question
        again = run_mtbench(_config(data, out, judge, limit=2, rejudge_unjudged=True), model=model, tokenizer=tok,
                            model_name="tiny")
        with pytest.raises(ConfigError, match="max_new_tokens=4"):
            run_mtbench(_config(data, out, judge, limit=2).replace(max_new_tokens=5), model=model, tokenizer=tok,
                        model_name="tiny")
    assert again.summary["unjudged"] == 0 and again.summary["judged"] == 4
    judgments = _lines(out / "judgments.jsonl")
    assert len(judgments) == 8 and all(j["score"] is not None for j in judgments)
    runs = {r["condition"]: r for r in read_mtbench(out)["runs"]}
    assert set(runs) == {"chat+dtype=float32", "chat+ind+steer(alpha=0.5,heads=0)+dtype=float32"}
    assert all(r["judged"] == 4 for r in runs.values())
    # the report: one table for the model, a row per condition, categories side by side
    from ctxaware.report import build_report, load_results

    (m,) = load_results([out])
    assert m.model == "tiny" and {r["condition"] for r in m.mtbench} == set(runs)
    page = build_report([out], tmp_path / "report.html").read_text()
    table = page.split("<h2>MT-Bench</h2>")[1].split("</table>")[0]
    assert "<th>writing</th><th>math</th><th>judged</th>" in table
    for cond, r in runs.items():
        row = table.split(f"<td>{cond}</td>")[1].split("</tr>")[0]
        assert f"<td>{r['score']:.2f}</td>" in row and f"<td>{r['categories']['math']:.2f}</td>" in row


def test_indicator_is_appended_to_every_user_turn(tiny, data, tmp_path, monkeypatch):
    from ctxaware.steering import SteeredModel

    model, tok = tiny
    asked: list = []
    original = SteeredModel.chat_batch

    def spy(self, conversations, *a, **kw):
        asked.extend(conversations)
        return original(self, conversations, *a, **kw)

    monkeypatch.setattr(SteeredModel, "chat_batch", spy)
    with FakeJudge() as judge:
        run_mtbench(_config(data, tmp_path / "o", judge, limit=1, indicator=True), model=model, tokenizer=tok)
    users = [m["content"] for conv in asked for m in conv if m["role"] == "user"]
    assert users == [QUESTIONS[0]["turns"][0] + " [IND]"] * 2 + [QUESTIONS[0]["turns"][1] + " [IND]"]


def test_cli_mtbench_end_to_end_and_one_line_errors(tiny, data, tmp_path, capsys):
    from ctxaware.cli.main import main

    model, tok = tiny
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    out = tmp_path / "cli"
    base = ["mtbench", "--model", str(mdir), "--dtype", "float32", "--device", "cpu", "--data-dir", str(data),
            "--out", str(out), "--max-new-tokens", "4", "--no-progress", "--judge-backoff", "0"]
    with FakeJudge() as judge:
        assert main(base + ["--judge-base-url", judge.base_url, "--limit", "2"]) == 0
        printed = capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        assert f"score {summary['score']:.2f}" in printed and "writing" in printed
        assert summary["model"] == str(mdir) and summary["judge"] == "fake-judge"
        for extra, needle in ((["--limit", "0"], "limit must be"),
                              (["--questions", str(tmp_path / "none.jsonl")], "not found"),
                              (["--judge-base-url", "http://127.0.0.1:9/v1"], "unreachable")):
            argv = base + (["--judge-base-url", judge.base_url] if "--judge-base-url" not in extra else []) + extra
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert needle in err and len(err.strip().splitlines()) == 1, err
    assert main(base) == 2
    assert "--judge-base-url" in capsys.readouterr().err


def test_download_is_checked_against_the_pinned_hashes(tmp_path, monkeypatch):
    """The download code, pointed at a local server: files whose hash differs are refused."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from ctxaware.mtbench import data as mdata

    root = tmp_path / "remote"
    write_data(root / "mt_bench")
    (root / "mt_bench" / "judge_prompts.jsonl").rename(root / "judge_prompts.jsonl")  # FastChat's layout

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CTXAWARE_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv(mdata.DATA_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/")
        with pytest.raises(InputError, match="differs from FastChat"):
            mdata.cached_data_dir()
        assert not (tmp_path / "cache" / "mtbench" / "question.jsonl").exists()
        digests = {name: (remote, mdata._sha256(root / remote)) for name, (remote, _) in mdata.DATA_FILES.items()}
        monkeypatch.setattr(mdata, "DATA_FILES", digests)
        got = mdata.cached_data_dir()
        assert (got / "question.jsonl").read_bytes() == (root / "mt_bench" / "question.jsonl").read_bytes()
        assert len(load_data(got).questions) == len(QUESTIONS)
        monkeypatch.setenv(mdata.DATA_URL_ENV, "http://127.0.0.1:9/")
        assert mdata.cached_data_dir() == got  # cached: no download
    finally:
        server.shutdown()
        server.server_close()


def test_study_runs_mtbench_plain_and_steered_into_its_directory(tiny, tmp_path):
    from ctxaware.study import StudyConfig, run_study

    model, tok = tiny
    data = write_data(tmp_path / "data")
    with pytest.raises(ConfigError, match="limit"):
        StudyConfig(out=str(tmp_path / "s"), mtbench_judge_url="http://127.0.0.1:9/v1", mtbench_limit=0)
    with FakeJudge() as judge:
        cfg = StudyConfig(out=str(tmp_path / "s"), lengths="200", depths="50", modes="chat,chat+steer",
                          max_new_tokens=3, attention_length=200, attention_depths="50", alpha=0.5, progress=False,
                          mtbench_judge_url=judge.base_url, mtbench_limit=2, mtbench_data_dir=str(data),
                          mtbench_max_new_tokens=4)
        run = run_study(cfg, model=model, tokenizer=tok, model_name="tiny")
    assert set(run.mtbench) == {"chat+dtype=float32", "chat+steer(alpha=0.5,heads=all)+dtype=float32"}
    assert all(s["judged"] == 4 and s["judge"] == "fake-judge" for s in run.mtbench.values())
    assert read_mtbench(tmp_path / "s" / "mtbench")["runs"] == [
        {k: v for k, v in s.items() if k not in ("all", "data")} for s in run.mtbench.values()]
    study = json.loads((tmp_path / "s" / "study.json").read_text())
    assert "--judge-base-url" in study["commands"]["mtbench"] and "--mtbench-limit 2" in study["commands"]["study"]
    page = (tmp_path / "s" / "report.html").read_text()
    assert "<h2>MT-Bench</h2>" in page and "chat+steer(alpha=0.5,heads=all)" in page
    with pytest.raises(JudgeError, match="unreachable"):
        run_study(cfg.replace(mtbench_judge_url="http://127.0.0.1:9/v1"), model=model, tokenizer=tok)


def test_adapter_and_no_template_conditions(tiny, data, tmp_path):
    """A PEFT adapter directory is loaded over the base it names; --no-template answers from raw text."""
    peft = pytest.importorskip("peft")
    from ctxaware.models import load_model

    model, tok = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    torch.manual_seed(0)
    lora = peft.get_peft_model(load_model(base, device="cpu", dtype="float32").model,
                               peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = str(base)
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "run"
    with FakeJudge() as judge:
        a = run_mtbench(_config(data, out, judge, limit=1, adapter=str(tmp_path / "adapter"), dtype="float32"))
        raw = run_mtbench(_config(data, out, judge, limit=1, model=str(base), template=False))
        plain = run_mtbench(_config(data, out, judge, limit=1, model=str(base), dtype="float32"))
        with pytest.raises(ConfigError, match="not both"):
            run_mtbench(_config(data, out, judge, adapter=str(tmp_path / "adapter")), model=model, tokenizer=tok)
    assert a.summary["model"] == raw.summary["model"] == str(base)
    import re

    assert re.fullmatch(r"chat\+adapter=adapter@[0-9a-f]{8}\+dtype=float32", a.summary["condition"])
    assert raw.summary["condition"].startswith("raw+dtype=")
    assert a.summary["judged"] == raw.summary["judged"] == 2
    assert {r["condition"] for r in read_mtbench(out)["runs"]} == {a.summary["condition"], raw.summary["condition"],
                                                                   plain.summary["condition"]}
    assert a.answers[0]["turns"] != plain.answers[0]["turns"]  # the adapter's weights were applied


def test_same_folder_name_adapters_dtypes_and_judges_never_share_answers(tiny, data, tmp_path):
    """Issue 26: two LoRA adapters both saved as ``.../model`` (sft-study's layout) into one --out, then two dtypes,
    then two judges: each is its own condition (or judge row) with its own answers, equal to a fresh directory's."""
    peft = pytest.importorskip("peft")
    from ctxaware.models import load_model

    model, tok = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    for seed, arm in ((0, "vanilla"), (1, "conditional")):
        torch.manual_seed(seed)
        lora = peft.get_peft_model(load_model(base, device="cpu", dtype="float32").model,
                                   peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        lora.peft_config["default"].base_model_name_or_path = str(base)
        lora.save_pretrained(tmp_path / arm / "model")
    out = tmp_path / "run"
    with FakeJudge() as judge:
        kw = dict(limit=1, device="cpu")
        runs = [run_mtbench(_config(data, out, judge, adapter=str(tmp_path / arm / "model"), dtype="float32", **kw))
                for arm in ("vanilla", "conditional")]
        fresh = run_mtbench(_config(data, tmp_path / "fresh", judge, adapter=str(tmp_path / "conditional" / "model"),
                                    dtype="float32", **kw))
        assert runs[0].summary["condition"] != runs[1].summary["condition"]
        assert runs[1].answers[0]["turns"] == fresh.answers[0]["turns"] != runs[0].answers[0]["turns"]
        bf16 = run_mtbench(_config(data, out, judge, adapter=str(tmp_path / "vanilla" / "model"), dtype="bfloat16",
                                   **kw))
        assert bf16.summary["condition"].endswith("+dtype=bfloat16") and bf16.seconds.get("generate")
        with FakeJudge() as other:  # another endpoint serving a judge of the same name: its own row
            again = run_mtbench(_config(data, out, other, adapter=str(tmp_path / "vanilla" / "model"),
                                        dtype="float32", **kw))
        assert "generate" not in again.seconds and again.summary["judged"] == 2
    rows = read_mtbench(out)["runs"]
    assert len(rows) == 4 and all(r["judged"] == 2 for r in rows)  # no row blends two judges or conditions
    assert len({(r["condition"], r["judge_url"]) for r in rows}) == 4
