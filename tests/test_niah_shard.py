"""Sharded NIH grids: shards write their own files into one directory, and merging them gives, byte for byte,
the results.jsonl (and summary, apart from timings) of one unsharded run — in one process, with two
``--shard`` CLI processes started at once, and with two CPU processes under ``accelerate launch``."""

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

from ctxaware.errors import ConfigError
from ctxaware.niah import NiahConfig, run_niah

torch.set_num_threads(1)
GRID = dict(needle="multi-query", lengths="400,500", depths="0,100", modes="raw,chat+prefix", max_new_tokens=5,
            dtype="float32", batch_size=2, progress=False)  # 8 cells, 4 decoding batches


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("shard") / "tiny"
    tiny_model(len(tok), seed=4).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """One unsharded run of the grid (loading the model from its directory, as the CLI does)."""
    out = tmp_path_factory.mktemp("ref") / "one"
    run_niah(NiahConfig(model=str(model_dir), out=str(out), **GRID), plot=False)
    return out


def _without_seconds(path: Path) -> dict:
    data = json.loads(path.read_text())
    for s in data["modes"].values():
        s.pop("seconds")
    return data


def _same_as_reference(out: Path, reference: Path) -> None:
    assert (out / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()
    assert _without_seconds(out / "summary.json") == _without_seconds(reference / "summary.json")
    assert not list(out.glob("*.shard-*"))  # merged shard files are removed
    keys = {json.loads(ln)["key"] for ln in (out / "timings.jsonl").read_text().splitlines()}
    assert keys == {json.loads(ln)["key"] for ln in (out / "results.jsonl").read_text().splitlines()}


def test_shards_in_one_process_then_merge(model_dir, reference, tmp_path):
    from ctxaware.models import load_model

    loaded = load_model(str(model_dir), dtype="float32")
    kw = dict(model=loaded.model, tokenizer=loaded.tokenizer, model_name=loaded.name, plot=False)
    out = tmp_path / "sharded"
    parts = [run_niah(NiahConfig(model=str(model_dir), out=str(out), shard=f"{i}/3", **GRID), **kw) for i in range(3)]
    # whole batches of the unsharded plan: batches 0 and 3, 1, 2
    assert [len(p.records) for p in parts] == [4, 2, 2] and all(p.shard[1] == 3 for p in parts)
    assert {r["key"] for p in parts for r in p.records} == \
        {json.loads(ln)["key"] for ln in (reference / "results.jsonl").read_text().splitlines()}
    assert not (out / "results.jsonl").exists() and not (out / "summary.json").exists()
    assert sorted(p.name for p in out.glob("results.shard-*")) == [f"results.shard-{i}-of-3.jsonl" for i in range(3)]
    again = run_niah(NiahConfig(model=str(model_dir), out=str(out), shard="1/3", **GRID), **kw)
    assert again.new_cells == 0  # a shard resumes from its own file
    merged = run_niah(NiahConfig(model=str(model_dir), out=str(out), **GRID), **kw)
    assert merged.new_cells == 0 and len(merged.records) == 8
    _same_as_reference(out, reference)
    with pytest.raises(ConfigError, match="--shard"):
        NiahConfig(shard="2/2")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def _argv(model_dir: Path, out: Path) -> list[str]:
    argv = ["niah", "--model", str(model_dir), "--out", str(out), "--no-progress"]
    for k, v in GRID.items():
        if k != "progress":
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


@pytest.mark.slow
def test_two_shard_processes_started_at_once(model_dir, reference, tmp_path):
    out = tmp_path / "cli"
    procs = [subprocess.Popen([sys.executable, "-m", "ctxaware", *_argv(model_dir, out), "--shard", f"{i}/2"],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert all("run the same command without --shard" in log for log in logs)
    assert sorted(p.name for p in out.glob("*.shard-*")) == sorted(
        f"{kind}.shard-{i}-of-2.jsonl" for kind in ("results", "timings") for i in range(2))
    merged = run_niah(NiahConfig(model=str(model_dir), out=str(out), **GRID), plot=False)
    assert merged.new_cells == 0
    _same_as_reference(out, reference)


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch(model_dir, reference, tmp_path):
    pytest.importorskip("accelerate")
    from test_training_multiproc import _free_port, _gloo_available

    reason = _gloo_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), "-m", "ctxaware",
           *_argv(model_dir, out)]
    proc = subprocess.run(cmd, env={**_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "process 1 of 2: the main process merges" in proc.stdout
    _same_as_reference(out, reference)
