"""Soak: ``ctxaware score`` and ``ctxaware niah`` killed with SIGKILL at seeded random points, resumed.

Each command runs once uninterrupted (the reference), then again in a fresh directory where it is
killed with ``kill -9`` several times — at kill points drawn from a seeded RNG (after a random number
of finished records, plus a random delay), once more with a torn line appended to the partial file
to mimic a write cut by the kill — and finally resumed to the end. The final outputs must equal the
reference: byte for byte for ``score``; for ``niah`` byte for byte once the wall-clock ``seconds``
of each cell (the only field that measures time, not results) is dropped. Real processes on a tiny
model saved to ``tmp_path``; marked slow (each run pays the interpreter + torch import).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_measure_models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

SEED = 20241104
KILLS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
WORDS = ["The quick brown fox.", "What is the capital of France?", "Cats sleep a lot.", "Hello!",
         "Summarise the text in one sentence.", "It was a bright cold day in April."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak_model")
    torch.manual_seed(0)
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", vocab=len(tok))
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    return root / "m"


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _run_killed(argv: list[str], progress_file: Path, rng: random.Random, total: int, *, tear: bool) -> int:
    """Start ``argv``, SIGKILL it once ``progress_file`` holds a random number of new lines (+ a random
    delay); return the line count at the kill. With ``tear`` append half a record afterwards."""
    start_lines = _lines(progress_file)
    target = start_lines + rng.randint(1, max(1, (total - start_lines) // 3))
    delay = rng.uniform(0.0, 0.15)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and _lines(progress_file) < target:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:  # finished (or failed) before the kill point
        err = proc.stderr.read().decode()
        assert proc.returncode == 0, err[-2000:]
        return -1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if tear:
        with open(progress_file, "ab") as fh:
            fh.write(b'{"_row": 9999, "ctx_sc' if "score" in argv else b'{"key": "torn|cell", "answ')
    return _lines(progress_file)


def _complete(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def _soak(argv_for, progress_of, total: int, tmp_path: Path, seed: int) -> tuple[Path, Path, list[int]]:
    rng = random.Random(seed)
    ref, part = tmp_path / "ref", tmp_path / "part"
    _complete(argv_for(ref))
    kills = []
    for k in range(KILLS):
        at = _run_killed(argv_for(part), progress_of(part), rng, total, tear=(k == 1))
        if at < 0:
            break
        kills.append(at)
    _complete(argv_for(part))
    return ref, part, kills


def test_score_killed_at_random_points_resumes_byte_identical(model_dir, tmp_path):
    rows = []
    for i in range(90):
        user = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 5))
        rows.append({"id": i, "messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": WORDS[(i * 7) % len(WORDS)]}]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def argv(d: Path) -> list[str]:
        return [sys.executable, "-m", "ctxaware", "score", "--in", str(data), "--out", str(d / "scored.jsonl"),
                "--model", str(model_dir), "--batch-size", "1", "--no-progress"]

    ref, part, kills = _soak(argv, lambda d: d / "scored.jsonl.partial.jsonl", len(rows) + 1, tmp_path, SEED)
    assert len(kills) >= 2, kills  # really interrupted, several times, at increasing points
    assert kills == sorted(kills)
    assert not (part / "scored.jsonl.partial.jsonl").exists()
    assert (part / "scored.jsonl").read_bytes() == (ref / "scored.jsonl").read_bytes()


def _niah_canonical(d: Path) -> bytes:
    out = []
    for line in (d / "results.jsonl").read_bytes().splitlines():
        rec = json.loads(line)
        rec.pop("seconds", None)
        out.append(json.dumps(rec, ensure_ascii=False, sort_keys=True))
    return "\n".join(sorted(out)).encode()


def test_niah_killed_at_random_points_resumes_identical(model_dir, tmp_path):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text(("A loom holds the warp under tension while the weft passes through. The weaver "
                                "counts threads per inch before anything else. ") * 12, encoding="utf-8")
    needle = tmp_path / "needle.json"
    needle.write_text(json.dumps({"needle": "The brass telescope is under the third bench.",
                                  "question": "Where is the brass telescope?",
                                  "keywords": ["third", "bench"]}), encoding="utf-8")
    lengths, depths = "150,200,250,300", "0,20,40,60,80,100"

    def argv(d: Path) -> list[str]:
        return [sys.executable, "-m", "ctxaware", "niah", "--model", str(model_dir), "--haystack", str(hay),
                "--needle", str(needle), "--lengths", lengths, "--depths", depths, "--modes", "chat",
                "--max-new-tokens", "8", "--batch-size", "1", "--out", str(d), "--no-progress"]

    ref, part, kills = _soak(argv, lambda d: d / "results.jsonl", 24, tmp_path, SEED + 1)
    assert len(kills) >= 2, kills
    assert len((ref / "results.jsonl").read_bytes().splitlines()) == 24
    assert _niah_canonical(part) == _niah_canonical(ref)
    assert b"torn|cell" not in (part / "results.jsonl").read_bytes()
    summary = {k: v for k, v in json.loads((part / "summary.json").read_text())["modes"]["chat"].items()
               if k != "seconds"}
    expected = {k: v for k, v in json.loads((ref / "summary.json").read_text())["modes"]["chat"].items()
                if k != "seconds"}
    assert summary == expected
