"""Soak: ``ctxaware score``, ``niah`` and ``train`` killed with SIGKILL at seeded random points, resumed.

Each command runs once uninterrupted (the reference), then again in a fresh directory where it is
killed with ``kill -9`` several times — at kill points drawn from a seeded RNG (after a random amount
of progress, plus a random delay), once with the kind of damage a kill mid-write leaves (a torn JSON
line; for ``train`` a checkpoint whose ``trainer_state.json`` was cut short) — and finally resumed to
the end. The final outputs must equal the reference's: byte for byte for ``score``'s output and
``niah``'s ``results.jsonl`` (wall-clock times live in ``timings.jsonl``); ``niah``'s summary equal
except the per-mode ``seconds``; for ``train`` (resumed with ``--resume-from-checkpoint auto``, a
checkpoint every step) every tensor of the final adapter, [IND] row included, exactly equal
(``torch.equal``). Real processes on tiny models saved to ``tmp_path``; marked slow (each run pays
the interpreter + torch import).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import shutil
import time
from pathlib import Path
from typing import Callable

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


def _run_killed(argv: list[str], progress: Callable[[], int], rng: random.Random, total: int,
                tear: Callable[[], None] | None) -> int:
    """Start ``argv``, SIGKILL it once ``progress()`` has grown by a random amount (+ a random delay);
    return the progress at the kill (-1 when the run finished first). ``tear`` then damages the output."""
    start = progress()
    target = start + rng.randint(1, max(1, (total - start) // 3))
    delay = rng.uniform(0.0, 0.02)  # short: a tiny model finishes the last rows within 0.15 s
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and progress() < target:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:  # finished (or failed) before the kill point
        err = proc.stderr.read().decode()
        assert proc.returncode == 0, err[-2000:]
        return -1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if tear is not None:
        tear()
    return progress()


def _appender(path: Path, data: bytes) -> Callable[[], None]:
    def tear() -> None:
        with open(path, "ab") as fh:
            fh.write(data)
    return tear


def _complete(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.stdout.decode()


def _soak(argv_for, progress_of, total: int, tmp_path: Path, seed: int,
          tear_of: Callable[[Path], Callable[[], None]]) -> tuple[Path, Path, list[int], str]:
    rng = random.Random(seed)
    ref, part = tmp_path / "ref", tmp_path / "part"
    _complete(argv_for(ref))
    kills = []
    for k in range(KILLS):
        at = _run_killed(argv_for(part), lambda: progress_of(part), rng, total, tear_of(part) if k == 1 else None)
        if at < 0:
            break
        kills.append(at)
    print(f"{argv_for(part)[3]}: killed at progress {kills} (seed {seed})")  # shown with pytest -s
    return ref, part, kills, _complete(argv_for(part))


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

    partial = "scored.jsonl.partial.jsonl"
    ref, part, kills, _ = _soak(argv, lambda d: _lines(d / partial), len(rows) + 1, tmp_path, SEED,
                             lambda d: _appender(d / partial, b'{"_row": 9999, "ctx_sc'))
    assert len(kills) >= 2, kills  # really interrupted, several times, at increasing points
    assert kills == sorted(kills)
    assert not (part / "scored.jsonl.partial.jsonl").exists()
    assert (part / "scored.jsonl").read_bytes() == (ref / "scored.jsonl").read_bytes()


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

    ref, part, kills, _ = _soak(argv, lambda d: _lines(d / "results.jsonl"), 24, tmp_path, SEED + 1,
                             lambda d: _appender(d / "results.jsonl", b'{"key": "torn|cell", "answ'))
    assert len(kills) >= 2, kills
    results = (part / "results.jsonl").read_bytes()
    assert len(results.splitlines()) == 24 and b'"seconds"' not in results
    assert results == (ref / "results.jsonl").read_bytes()  # byte for byte
    assert b"torn|cell" not in results
    timed = [json.loads(ln) for ln in (part / "timings.jsonl").read_bytes().splitlines()]
    assert {t["key"] for t in timed} == {json.loads(ln)["key"] for ln in results.splitlines()}
    summary = json.loads((part / "summary.json").read_text())["modes"]["chat"]
    expected = json.loads((ref / "summary.json").read_text())["modes"]["chat"]
    assert summary.pop("seconds") > 0 and expected.pop("seconds") > 0
    assert summary == expected
    pngs = sorted(p.name for p in ref.glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in part.glob("*.png"))
    for name in pngs:  # heatmaps are pure functions of results.jsonl
        assert (part / name).read_bytes() == (ref / name).read_bytes(), name


def _checkpoint_steps(out: Path) -> int:
    """The highest step with a finished checkpoint in ``out`` (0 before the first)."""
    steps = [int(d.name.split("-")[1]) for d in out.glob("checkpoint-*") if (d / "trainer_state.json").is_file()]
    return max(steps, default=0)


def _half_written_checkpoint(out: Path) -> Callable[[], None]:
    """Mimic a kill while the Trainer saved the next checkpoint: a copy of the newest with its
    ``trainer_state.json`` (written last) cut in half, numbered one step further."""
    def tear() -> None:
        step = _checkpoint_steps(out)
        src, dst = out / f"checkpoint-{step}", out / f"checkpoint-{step + 1}"
        if step and not dst.exists():
            shutil.copytree(src, dst)
            state = (dst / "trainer_state.json").read_bytes()
            (dst / "trainer_state.json").write_bytes(state[: len(state) // 2])
    return tear


def test_train_killed_at_random_points_resumes_to_the_same_weights(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    from safetensors.torch import load_file
    from test_training import CHATS, make_model, make_tokenizer

    tok = make_tokenizer("chatml")
    make_model(len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": CHATS[i % len(CHATS)]}) + "\n" for i in range(12)),
                    encoding="utf-8")
    steps = 12  # 6 per epoch: the kills land in either epoch, the resumed data order must still match

    def argv(d: Path) -> list[str]:
        return [sys.executable, "-m", "ctxaware", "train", "--model", str(tmp_path / "base"), "--dataset", str(data),
                "--output-dir", str(d), "--cpu", "--no-progress", "--max-steps", str(steps), "--save-steps", "1",
                "--save-total-limit", "2", "--per-device-train-batch-size", "2", "--learning-rate", "1e-2",
                "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lr-scheduler-type", "cosine",
                "--warmup-ratio", "0.2", "--max-length", "128", "--lora-target-modules", "q_proj,v_proj",
                "--resume-from-checkpoint", "auto", "--sft-arg", "optim=adamw_torch", "--json"]

    ref, part, kills, final = _soak(argv, _checkpoint_steps, steps, tmp_path, SEED + 2, _half_written_checkpoint)
    assert len(kills) >= 2, kills
    assert kills == sorted(kills)
    resumed = json.loads(final.strip().splitlines()[-1])["resumed_from"]
    assert resumed is not None and int(Path(resumed).name.split("-")[1]) > 0  # really resumed, not retrained
    got, want = load_file(part / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and any("trainable_tokens" in k for k in want)  # the [IND] row
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not (part / ".ctxaware-save.tmp").exists()
    assert sorted(d.name for d in part.glob("checkpoint-*")) == sorted(d.name for d in ref.glob("checkpoint-*"))
