"""``--engine vllm``: an NIH grid answered by vLLM's offline engine equals the transformers engine's.

Runs in the vLLM environment (``.venv-vllm/bin/python -m pytest tests/test_vllm_engine.py``); skipped
where vLLM is absent. One vLLM engine (in this process, eager, small KV cache) serves the module.
Checks: records with the same fields and formats as the transformers engine's; plain answers equal
(fp32, greedy) except where the transformers engine's own logits at the first differing token are a
near-tie (within :data:`NOISE`); ``+steer`` cells go through ctxaware's vLLM plugin; resumption.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
#: logit gap (top-1 minus top-2, fp32) under which two fp32 engines may pick different greedy tokens
NOISE = 1e-3
VLLM_OPTIONS = {"enforce_eager": True, "max_model_len": 2048, "block_size": 32}
GRID = dict(lengths="300,700", depths="0,100", modes="chat,chat+prefix,raw,chat+steer", alpha=0.6,
            max_new_tokens=12, dtype="float32", device="cpu", progress=False, batch_size=4)


@pytest.fixture(scope="module")
def model_dir():
    from ctxaware.vllm.models import tiny_model_dir

    # initializer_range 0.2: varied greedy tokens (the default's tiny weights answer "\n" to everything)
    return tiny_model_dir("llama", layers=2, heads=4, kv_heads=2, head_dim=32, seed=3, initializer_range=0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    """The same grid through both engines (vLLM twice: fresh, then resumed with one cell removed)."""
    from ctxaware.niah import NiahConfig, run_niah

    tmp = tmp_path_factory.mktemp("engines")
    tf = run_niah(NiahConfig(model=model_dir, out=str(tmp / "tf"), **GRID), plot=False)
    cfg = NiahConfig(model=model_dir, out=str(tmp / "vllm"), engine="vllm", vllm_options=VLLM_OPTIONS, **GRID)
    vl = run_niah(cfg, plot=False)
    return tf, vl, cfg


def _prompt(cfg, record):
    """A record's prompt (RenderedChat), rebuilt as the runner renders it."""
    from ctxaware.models import load_tokenizer
    from ctxaware.niah.haystack import Haystack, read_haystack
    from ctxaware.niah.needles import load_needle
    from ctxaware.niah.prompts import build_prompt

    tok = load_tokenizer(cfg.model)
    needle = load_needle(cfg.needle)
    hay = Haystack(read_haystack(cfg.haystack), tok)
    placement = hay.place_task(needle, record["length"], record["depth"], reserve=cfg.reserve)
    return build_prompt(tok, placement.text, needle, record["mode"], system=cfg.system,
                        system_message=cfg.system_message).rendered


def divergence_gap(model, tok, rendered, other_answer: str, steer_cfg=None) -> float:
    """Greedy-decode ``rendered`` with transformers (fp32) and return the top-1 minus top-2 logit at the
    first step whose text leaves ``other_answer`` (the step where the two engines chose differently)."""
    import contextlib

    from ctxaware.steering import steer

    ids = list(rendered.input_ids)
    ctx = steer(model, steer_cfg, rendered) if steer_cfg is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for _ in range(GRID["max_new_tokens"]):
            top = model(torch.tensor([ids])).logits[0, -1].double().topk(2)
            ids.append(int(top.indices[0]))
            text = tok.decode(ids[len(rendered.input_ids):], skip_special_tokens=True).strip()
            if not other_answer.startswith(text):
                return float(top.values[0] - top.values[1])
    return 0.0


def _compare(runs, model_dir, steered: bool) -> tuple[int, list[float]]:
    from ctxaware.models import load_model
    from ctxaware.niah.runner import steering_config

    tf, vl, cfg = runs
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    pairs = [(a, b) for a, b in zip(tf.records, vl.records) if ("steer" in a["mode"]) == steered]
    assert pairs
    gaps = []
    for a, b in pairs:
        if a["answer"] == b["answer"]:
            assert a["answer_tokens"] == b["answer_tokens"] and a["truncated"] == b["truncated"]
            continue
        gaps.append(divergence_gap(model, tok, _prompt(cfg, a), b["answer"], steering_config(cfg) if steered else None))
    return len(pairs), gaps


def test_records_have_the_transformers_format(runs):
    tf, vl, _ = runs
    assert len(tf.records) == len(vl.records) == 16
    assert all(r["answer"] and r["answer_tokens"] == GRID["max_new_tokens"] for r in tf.records)  # real answers
    for a, b in zip(tf.records, vl.records):
        assert set(a) == set(b)
        for k in a:
            assert type(a[k]) is type(b[k]) or {type(a[k]), type(b[k])} <= {int, float}, k
        same = {k for k in a if k not in ("key", "answer", "recall", "truncated", "answer_tokens", "found")}
        assert {k: a[k] for k in same} == {k: b[k] for k in same}  # same cell, same prompt (prompt_sha256)
    assert set(tf.summary) == set(vl.summary)


def test_plain_answers_equal_the_transformers_engine(runs, model_dir):
    n, gaps = _compare(runs, model_dir, steered=False)
    assert all(g < NOISE for g in gaps), f"{len(gaps)} of {n} plain answers differ beyond noise: logit gaps {gaps}"
    assert len(gaps) <= n // 4


def test_steered_answers_equal_the_transformers_engine(runs, model_dir):
    """+steer cells go through ctxaware's vLLM plugin and answer as ctxaware's own steered model."""
    tf, vl, _ = runs
    assert all(b["alpha"] == 0.6 for b in vl.records if "steer" in b["mode"])
    n, gaps = _compare(runs, model_dir, steered=True)
    assert all(g < NOISE for g in gaps), f"{len(gaps)} of {n} steered answers differ beyond noise: logit gaps {gaps}"


def test_vllm_cells_never_reuse_transformers_cells(runs, tmp_path):
    import shutil

    from ctxaware.errors import ConfigError
    from ctxaware.niah import NiahConfig, run_niah

    tf, _, cfg = runs
    shutil.copytree(tf.out, tmp_path / "mixed")
    with pytest.raises(ConfigError, match="engine"):
        run_niah(NiahConfig(**{**cfg.to_dict(), "out": str(tmp_path / "mixed")}), plot=False)


def test_resumes(runs):
    from ctxaware.niah import run_niah
    from ctxaware.niah.results import read_records

    _, vl, cfg = runs
    again = run_niah(cfg, plot=False)
    assert again.new_cells == 0 and again.records == vl.records
    results = Path(vl.out) / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    dropped = json.loads(lines[3])
    results.write_text("".join(lines[:3] + lines[4:]))
    resumed = run_niah(cfg, plot=False)
    assert resumed.new_cells == 1
    assert [r["answer"] for r in read_records(vl.out)] == [r["answer"] for r in vl.records]
    assert next(r for r in resumed.records if r["key"] == dropped["key"]) == dropped


def test_engine_reports_prefix_reuse(model_dir):
    """Cells of one haystack share their prefill: vLLM's prefix cache serves the shared blocks."""
    from ctxaware.chat import render
    from ctxaware.engines import vllm_settings
    from ctxaware.models import load_tokenizer
    from ctxaware.niah import NiahConfig
    from ctxaware.niah.engine import Job
    from ctxaware.vllm.generate import VllmEngine, vllm_llm

    cfg = NiahConfig(model=model_dir, engine="vllm", vllm_options=VLLM_OPTIONS, dtype="float32", device="cpu")
    tok = load_tokenizer(model_dir)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    jobs = [Job(render(tok, [{"role": "user", "content": text + q}], add_generation_prompt=True), tag=q)
            for q in ("Where is the fox?", "What colour is the fox?", "Is the dog lazy?")]
    engine = VllmEngine(vllm_llm(vllm_settings(cfg)), tok, 4, batch_size=8)
    got = {}
    engine.run(jobs, lambda j, a: got.__setitem__(j.tag, (a, j.new_tokens)))
    assert len(got) == 3 and all(n >= 1 for _, n in got.values())
    assert engine.cached_tokens >= 2 * 32 * (len(jobs[0].rendered.input_ids) // 32 - 2)


def test_shards_merge_into_the_grid(runs, tmp_path):
    """--shard with --engine vllm: shards take whole (length, depth) groups; a run without --shard merges them."""
    from ctxaware.niah import NiahConfig, run_niah

    _, vl, cfg = runs
    out = str(tmp_path / "sharded")
    parts = [run_niah(NiahConfig(**{**cfg.to_dict(), "out": out, "shard": f"{i}/2"}), plot=False) for i in (0, 1)]
    assert sorted(len(p.records) for p in parts) == [8, 8]
    for p in parts:
        assert len({(r["length"], r["depth"]) for r in p.records}) == 2  # every mode of a placement in one shard
    merged = run_niah(NiahConfig(**{**cfg.to_dict(), "out": out}), plot=False)
    assert merged.new_cells == 0
    assert [r["key"] for r in merged.records] == [r["key"] for r in vl.records]
    assert [r["answer"] for r in merged.records] == [r["answer"] for r in vl.records]  # fp32 on CPU


def test_mtbench_on_vllm_answers_as_transformers(model_dir, tmp_path):
    """mtbench --engine vllm: both turns through VllmEngine (plain and steered), the same answers as the
    transformers engine in fp32, records of the same fields, the condition named +engine=vllm."""
    pytest.importorskip("httpx")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from mtbench_judge import FakeJudge, write_data

    from ctxaware.mtbench import MtBenchConfig, run_mtbench

    data = write_data(tmp_path / "data")
    with FakeJudge() as judge:
        def run(**kw):
            return run_mtbench(MtBenchConfig(model=model_dir, data_dir=str(data), out=str(tmp_path / "mt"),
                                             judge_base_url=judge.base_url, judge_model="fake-judge", max_new_tokens=6,
                                             dtype="float32", device="cpu", progress=False, **kw))
        tf, vl = run(), run(engine="vllm", vllm_options=VLLM_OPTIONS)
        tf_s, vl_s = run(alpha=0.6), run(alpha=0.6, engine="vllm", vllm_options=VLLM_OPTIONS)
    assert "+engine=vllm" in vl.summary["condition"]
    assert vl.summary["condition"].replace("+engine=vllm", "") == tf.summary["condition"]
    for a, b in ((tf, vl), (tf_s, vl_s)):
        assert len(a.answers) == len(b.answers) == 4
        assert [set(x) for x in a.answers] == [set(x) for x in b.answers]
        assert [x["turns"] for x in a.answers] == [x["turns"] for x in b.answers]
    assert [x["turns"] for x in tf.answers] != [x["turns"] for x in tf_s.answers]  # steering changed something


def test_study_runs_niah_on_vllm_and_attention_on_transformers(model_dir, tmp_path):
    from ctxaware.study import StudyConfig, run_study

    cfg = StudyConfig(model=model_dir, out=str(tmp_path / "study"), lengths="300", depths="0,100",
                      modes="chat,chat+steer", max_new_tokens=6, attention_length=300, attention_depths="50",
                      dtype="float32", device="cpu", report=False, progress=False, engine="vllm",
                      vllm_options=VLLM_OPTIONS)
    run = run_study(cfg)
    assert len(run.niah.records) == 4 and run.attention and run.attention.get("settings")
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert "--engine vllm" in study["commands"]["niah"]


def test_sft_study_evaluates_an_arm_on_vllm(model_dir, tmp_path):
    """sft-study's evaluation of one arm with --engine vllm: NIH through vLLM (no transformers model loaded for it),
    attention on transformers after vLLM is shut down."""
    from ctxaware.sftstudy import SftStudyConfig
    from ctxaware.sftstudy.runner import _evaluate_arm
    from ctxaware.vllm import generate

    cfg = SftStudyConfig(out=str(tmp_path / "sft"), lengths="300", depths="0", modes="chat", max_new_tokens=4,
                         attention_length=300, attention_depths="50", dtype="float32", device="cpu", progress=False,
                         engine="vllm", vllm_options=VLLM_OPTIONS)
    record = _evaluate_arm(cfg, "conditional", model_dir)
    assert record["niah_cells"] == 2 and record["modes"] == ["chat+ind", "chat"]
    assert not generate._LLMS  # vLLM released for the next arm
    assert (tmp_path / "sft" / "conditional" / "attention" / "attention.json").is_file()
