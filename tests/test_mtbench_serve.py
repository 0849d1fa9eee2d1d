"""MT-Bench over real HTTP: ``ctxaware serve`` as the judge, and a run killed with SIGKILL then resumed.

The served judge is a tiny random model, so its replies carry no rating: the run checks the
pipeline end to end (every turn asked over HTTP, the raw reply recorded, equal to the served model's
own greedy reply) and that unparseable replies end as null scores after the retries, never 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mtbench_judge import QUESTIONS, FakeJudge, expected_summary, write_data
from test_measure_models import tiny_model
from test_niah_unit import tiny_tokenizer
from test_serve import _model

from ctxaware.mtbench import MtBenchConfig, parse_rating, read_mtbench, run_mtbench
from ctxaware.mtbench.data import judge_messages, load_data

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    return tiny_model("llama", vocab=len(tok), layers=2), tok


def test_ctxaware_serve_judges_over_http(tiny, tmp_path):
    from ctxaware.serve import BackgroundServer, ServeConfig, build_app
    from ctxaware.steering import SteeredModel

    model, tok = tiny
    judge_model = _model(len(tok), tok.eos_token_id, tok.pad_token_id)  # float64: batching cannot flip a near-tie
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    app = build_app(judge_model, tok, "tiny-judge", ServeConfig(port=0, max_concurrency=4, timeout=60), steering=None)
    with BackgroundServer(app) as srv:
        cfg = MtBenchConfig(data_dir=str(data), out=str(out), limit=3, judge_base_url=srv.base_url, max_new_tokens=4,
                            judge_max_tokens=8, judge_retries=1, judge_backoff=0.0, judge_concurrency=4,
                            progress=False)
        run = run_mtbench(cfg, model=model, tokenizer=tok, model_name="tiny")
    assert run.summary["judge"] == "tiny-judge"  # the endpoint's only model, from /v1/models
    assert len(run.judgments) == 6 and {(j["question_id"], j["turn"]) for j in run.judgments} == \
        {(q["question_id"], t) for q in QUESTIONS[:3] for t in (1, 2)}
    d = load_data(data)
    questions = {q.question_id: q for q in d.questions}
    answers = {a["question_id"]: a for a in run.answers}
    reference = SteeredModel(judge_model, tok)
    for j in run.judgments:
        _, messages = judge_messages(questions[j["question_id"]], answers[j["question_id"]]["turns"], j["turn"],
                                     d.prompts)
        assert j["judge_reply"].strip() == reference.chat(messages, max_new_tokens=8)
        assert j["score"] == parse_rating(j["judge_reply"])
        if j["score"] is None:
            assert j["tries"] == 2 and "rating" in j["error"]
    scored = [j["score"] for j in run.judgments if j["score"] is not None]
    assert run.summary["judged"] == len(scored) and run.summary["unjudged"] == 6 - len(scored)
    assert run.summary["score"] == (sum(scored) / len(scored) if scored else None)
    assert read_mtbench(out)["runs"][0]["unjudged"] == run.summary["unjudged"]


@pytest.mark.slow  # a Python process that imports torch and transformers, killed and started again
def test_killed_process_resumes_without_judging_any_turn_twice(tiny, tmp_path):
    model, tok = tiny
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with FakeJudge({(2, 1): ["500"]}) as judge:
        argv = [sys.executable, "-m", "ctxaware", "mtbench", "--model", str(mdir), "--device", "cpu", "--dtype",
                "float32", "--data-dir", str(data), "--out", str(out), "--max-new-tokens", "4", "--no-progress",
                "--judge-base-url", judge.base_url, "--judge-model", "fake-judge", "--judge-concurrency", "2",
                "--judge-backoff", "0"]
        judge.hang_after = 3  # after 3 rated replies every request blocks: the process is killed mid-judging
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.monotonic()
            path = out / "judgments.jsonl"
            while not (path.is_file() and len(path.read_text().splitlines()) >= 3):
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() - t0 < 240, "the run never judged 3 turns"
                time.sleep(0.1)
            time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        judge.hang_after = None
        judge.release.set()
        assert len(path.read_text().splitlines()) == sum(judge.rated.values()) >= 3  # every rated reply kept
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
    keys = {(q["question_id"], t) for q in QUESTIONS for t in (1, 2)}
    assert set(judge.rated) == keys and all(n == 1 for n in judge.rated.values())  # no turn judged twice
    judgments = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(judgments) == 8 and {(j["question_id"], j["turn"]) for j in judgments} == keys
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judged"] == 8 and summary["score"] == pytest.approx(expected_summary(out)["score"])
    assert len((out / "answers.jsonl").read_text().splitlines()) == 4
