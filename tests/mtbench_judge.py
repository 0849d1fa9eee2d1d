"""Test helpers for MT-Bench: a small data folder and a fake OpenAI-compatible judge on 127.0.0.1.

The fake judge rates each answer with a known function of it (:func:`rating`), reads the question
and turn back from the judge prompt of :func:`write_data`'s templates, counts requests per
(question, turn), and injects faults per (question, turn): ``500``, ``429``, ``timeout`` (sleeps past
the client's timeout), ``norating`` (a reply without ``[[x]]``), or ``hang`` (blocks until released).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2 + 3?", "And times 4?"],
     "reference": ["2 + 3 = 5.", "5 x 4 = 20."]},
    {"question_id": 3, "category": "coding", "turns": ["Reverse a list in Python.", "Now in place."]},
    {"question_id": 4, "category": "roleplay", "turns": ["Pretend to be a pirate.", "Say goodbye."]},
]
REFERENCES = [{"question_id": 3, "answer_id": "x", "model_id": "gpt-4",
               "choices": [{"index": 0, "turns": ["Use xs[::-1].", "Use xs.reverse()."]}], "tstamp": 0}]
ONE = "<<Q1>>{question}<</Q1>>\n<<A1>>{answer}<</A1>>"
TWO = "<<Q1>>{question_1}<</Q1>>\n<<A1>>{answer_1}<</A1>>\n<<Q2>>{question_2}<</Q2>>\n<<A2>>{answer_2}<</A2>>"
PROMPTS = [
    {"name": "single-v1", "type": "single", "system_prompt": "Judge.", "prompt_template": ONE,
     "description": "", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "Judge math.",
     "prompt_template": "<<R1>>{ref_answer_1}<</R1>>\n" + ONE, "description": "", "category": "math",
     "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Judge turn 2.", "prompt_template": TWO,
     "description": "", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Judge math turn 2.",
     "prompt_template": "<<R1>>{ref_answer_1}<</R1>><<R2>>{ref_answer_2}<</R2>>\n" + TWO, "description": "",
     "category": "math", "output_format": "[[rating]]"},
]


def write_data(folder: Path) -> Path:
    """A FastChat-layout data folder with :data:`QUESTIONS`, its references and the test templates."""
    (folder / "reference_answer").mkdir(parents=True, exist_ok=True)
    (folder / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "reference_answer" / "gpt-4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REFERENCES))
    (folder / "judge_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return folder


def rating(answer: str) -> int:
    """The fake judge's rating of an answer: a known function of its text, in 1..10."""
    return 1 + len(answer) % 10


def _between(text: str, tag: str) -> str | None:
    m = re.search(f"<<{tag}>>(.*?)<</{tag}>>", text, re.S)
    return m.group(1) if m else None


class FakeJudge:
    """``with FakeJudge(faults) as judge: judge.base_url`` — a judge server in a thread."""

    def __init__(self, faults: dict | None = None, *, timeout_sleep: float = 2.0, max_requests: int = 500,
                 model: str = "fake-judge") -> None:
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.timeout_sleep, self.max_requests, self.model = timeout_sleep, max_requests, model
        self.requests: Counter = Counter()  # (question_id, turn) -> requests received
        self.rated: Counter = Counter()  # (question_id, turn) -> replies sent with a rating
        self.seen: list[dict] = []  # every parsed request body
        self.release = threading.Event()
        self.hang_after: int | None = None  # rated replies after which every request hangs until release
        self.models_sleep = 0.0  # seconds GET /models takes
        self._lock = threading.Lock()
        by_q1 = {q["turns"][0]: q["question_id"] for q in QUESTIONS}
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if judge.models_sleep:
                    time.sleep(judge.models_sleep)
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": judge.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "no route"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                user = body["messages"][-1]["content"]
                qid, turn = by_q1.get(_between(user, "Q1")), 2 if "<<Q2>>" in user else 1
                key = (qid, turn)
                with judge._lock:
                    judge.seen.append(body)
                    judge.requests[key] += 1
                    total = sum(judge.requests.values())
                    fault = judge.faults.get(key, []).pop(0) if judge.faults.get(key) else None
                    hang = judge.hang_after is not None and sum(judge.rated.values()) >= judge.hang_after
                if total > judge.max_requests:
                    return self._send(500, {"error": {"message": "request budget of the test judge spent"}})
                if hang:
                    judge.release.wait(60)
                    return self._send(500, {"error": {"message": "released"}})
                if fault == "500":
                    return self._send(500, {"error": {"message": "boom"}})
                if fault == "429":
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                if fault == "timeout":
                    time.sleep(judge.timeout_sleep)
                answer = _between(user, "A2" if turn == 2 else "A1")
                text = "The answer is fine." if fault == "norating" else f"Fair. Rating: [[{rating(answer)}]]"
                if fault != "norating" and fault != "timeout":
                    with judge._lock:
                        judge.rated[key] += 1
                self._send(200, {"id": "x", "object": "chat.completion", "model": judge.model,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def expected_summary(out: Path) -> dict:
    """Scores recomputed independently from answers.jsonl: the fake judge's rating of each judged turn."""
    answers = {a["question_id"]: a for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    judged = [j for j in map(json.loads, (out / "judgments.jsonl").read_text().splitlines())
              if j["score"] is not None]
    scores = [rating(answers[j["question_id"]]["turns"][j["turn"] - 1]) for j in judged]
    by_turn = {t: [rating(answers[j["question_id"]]["turns"][t - 1]) for j in judged if j["turn"] == t]
               for t in (1, 2)}
    return {"score": sum(scores) / len(scores) if scores else None,
            "turns": {str(t): (sum(v) / len(v) if v else None) for t, v in by_turn.items()}}
