"""NIH results are the results of the same run (issue 26): cells keyed by their result identity (steering rule and
share included), shards of whole batches equal to the unsharded run byte for byte in bf16 and fp32, --overwrite
clearing every shard, and one process at a time per --out (a second is refused, never doubled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_niah_runner import tiny_model
from test_niah_unit import tiny_tokenizer

from ctxaware.errors import BusyError, ConfigError
from ctxaware.fsio import DirLock
from ctxaware.niah import NiahConfig, run_niah
from ctxaware.steering import SteeringConfig
from ctxaware.steering.file import write_steering_file

torch.set_num_threads(1)
# a multi-value needle at two lengths and depths, two modes (the grid, scaled to the tiny model)
GRID = dict(needle="multi-value", lengths="300,420", depths="0,50", modes="chat,chat+steer", alpha=0.5,
            max_new_tokens=6, batch_size=3, prefill_chunk=64, progress=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tok):
    return tiny_model(len(tok), seed=5).to(getattr(torch, request.param))


def _run(model, tok, out, **kw):
    return run_niah(NiahConfig(out=str(out), **{**GRID, **kw}), model=model, tokenizer=tok, model_name="tiny",
                    plot=False)


def test_shards_of_whole_batches_equal_the_unsharded_run(model, tok, tmp_path):
    ref = _run(model, tok, tmp_path / "one")
    for n in (2, 3, 5):
        out = tmp_path / f"shards{n}"
        parts = [_run(model, tok, out, shard=f"{i}/{n}") for i in range(n)]
        assert sum(len(p.records) for p in parts) == len(ref.records) == 8
        merged = _run(model, tok, out)
        assert merged.new_cells == 0
        assert (out / "results.jsonl").read_bytes() == (tmp_path / "one" / "results.jsonl").read_bytes()


def test_a_run_killed_mid_batch_resumes_to_the_same_bytes(model, tok, tmp_path):
    _run(model, tok, tmp_path / "one")
    full = (tmp_path / "one" / "results.jsonl").read_bytes()
    out = tmp_path / "killed"
    _run(model, tok, out)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][:10])  # 4 cells kept, a torn 5th
    again = _run(model, tok, out)
    assert again.new_cells == 4
    assert (out / "results.jsonl").read_bytes() == full


def test_share_rule_cells_are_keyed_by_their_share(model, tok, tmp_path):
    """Bug 1 of issue 26: share 0.3 then 0.9 into one --out reported the 0.3 answers as the 0.9 ones."""
    files = {s: write_steering_file(tmp_path / f"s{s}.yaml", SteeringConfig(rule="share", share=s)) for s in (0.3, 0.9)}
    grid = dict(modes="chat+steer")
    _run(model, tok, tmp_path / "both", steering=str(files[0.3]), **grid)
    second = _run(model, tok, tmp_path / "both", steering=str(files[0.9]), **grid)
    fresh = _run(model, tok, tmp_path / "fresh", steering=str(files[0.9]), **grid)
    assert second.new_cells == len(second.records) == 4
    assert [r["answer"] for r in second.records] == [r["answer"] for r in fresh.records]
    assert all(r["steering"]["rule"] == "share" and r["steering"]["share"] == 0.9 for r in second.records)
    for change in ({"emphasis": "system+user"}, {"compounding": "reference"}):  # every steering field counts
        again = _run(model, tok, tmp_path / "both", steering=str(write_steering_file(
            tmp_path / "x.yaml", SteeringConfig(rule="share", share=0.9, **change))), **grid)
        assert again.new_cells == 4


def test_overwrite_clears_every_shard_and_old_dirs_are_refused(tok, tmp_path):
    m = tiny_model(len(tok), seed=5)
    out = tmp_path / "o"
    for i in range(2):
        _run(m, tok, out, shard=f"{i}/2")
    other = _run(m, tok, out, shard="0/2", max_new_tokens=4, overwrite=True)
    assert not (out / "results.shard-1-of-2.jsonl").exists()  # shard 1's old cells are gone
    assert 0 < len(other.records) < 8 and json.loads((out / "manifest.json").read_text())["identity"]["decoding"][
        "max_new_tokens"] == 4
    merged = _run(m, tok, out, max_new_tokens=4)
    assert {r["key"] for r in merged.records} == {json.loads(ln)["key"] for ln in (out / "results.jsonl").open()}
    # a directory written before result identities: refused with the fix, unless --overwrite
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("identity")
    manifest["study"] = {"model": "tiny"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="older ctxaware.*--overwrite"):
        _run(m, tok, out, max_new_tokens=4)
    assert _run(m, tok, out, max_new_tokens=4, overwrite=True).new_cells == 8


def test_a_live_lock_refuses_a_stale_one_is_taken_over(tok, tmp_path):
    m = tiny_model(len(tok), seed=5)
    out = tmp_path / "o"
    with DirLock(out, "niah"):  # another unsharded run is writing here
        for kw in ({}, {"shard": "1/2"}, {"overwrite": True}):
            with pytest.raises(BusyError) as exc:
                _run(m, tok, out, **kw)
            assert "\n" not in str(exc.value) and f"pid {os.getpid()}" in str(exc.value)
        assert not (out / "results.jsonl").exists() and not list(out.glob("results.shard-*"))
    with DirLock(out, "niah-shard-0-of-2"):
        _run(m, tok, out, shard="1/2")  # another shard of the same run may write beside it
        with pytest.raises(BusyError, match="shard 0 of 2"):
            _run(m, tok, out)  # but a merge would take its half-written file
        with pytest.raises(BusyError, match="--overwrite would delete"):
            _run(m, tok, out, shard="1/2", overwrite=True)
    (out / ".niah.lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))  # stale: nobody holds it
    assert len(_run(m, tok, out).records) == 8
    assert DirLock.holders(out) == {}  # released at the end


def _argv(model_dir: Path, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "ctxaware", "niah", "--model", str(model_dir), "--out", str(out), "--no-progress",
            "--dtype", "float32", "--device", "cpu"]
    for k, v in GRID.items():
        if k != "progress":
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def test_two_processes_into_one_out(tok, tmp_path):
    """Two terminals (or a retried scheduler job) into one --out: one computes, the other is refused with one line
    (exit 2); no cell is computed twice into the file, nothing is torn, and a rerun finds everything done."""
    model_dir = tmp_path / "tiny"
    tiny_model(len(tok), seed=5).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(_argv(model_dir, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    lines = [ln for ln in (out / "results.jsonl").read_text().splitlines()]
    keys = [json.loads(ln)["key"] for ln in lines]
    assert len(keys) == len(set(keys)) == 8  # every cell once, every line whole
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:  # the second was refused, in one line
        err = next(e for p, (_, e) in zip(procs, results) if p.returncode == 2).strip()
        assert len(err.splitlines()) == 1 and "being written by another run" in err or "another run writes" in err
    rerun = subprocess.run(_argv(model_dir, out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and (out / "results.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_cache_does_not_depend_on_the_prompt_before(dtype):
    """The prefix cache is reused in whole aligned prefill chunks: each prompt's first-token logits and cache are
    bit for bit those of the prompt prefilled alone (a cache cropped at any position would differ in the low bits)."""
    from test_niah_engine import _jobs, _model

    from ctxaware.niah.engine import GreedyEngine
    from ctxaware.niah.haystack import Haystack, read_haystack
    from ctxaware.steering import SteeringConfig

    tok = tiny_tokenizer()
    hay = Haystack(read_haystack("builtin"), tok)
    model = _model(len(tok), seed=2).to(dtype)

    def logits_of(jobs):
        engine = GreedyEngine(model, tok, 2, steer_config=SteeringConfig(alpha=0.5), batch_size=3, chunk=64)
        got, prefill = {}, engine._prefill

        def spy(cache, ids, start, job):
            out = prefill(cache, ids, start, job)
            got[job.tag] = (start, out.clone(), [k.clone() for k, _ in [(layer.keys, 0) for layer in cache.layers]])
            return out

        engine._prefill = spy
        engine.run(jobs, lambda job, answer: None)
        return got

    together = logits_of(_jobs(tok, hay))
    assert sum(start > 0 for start, _, _ in together.values()) >= 6  # prefixes were reused
    for job in _jobs(tok, hay):
        start, logits, keys = logits_of([job])[job.tag]
        assert start == 0
        assert torch.equal(logits, together[job.tag][1]), job.tag
        assert all(torch.equal(a, b) for a, b in zip(keys, together[job.tag][2])), job.tag
