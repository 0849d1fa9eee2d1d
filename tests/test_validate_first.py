"""Every option is checked before any work (issue 26): each command, given each malformed option of a table, exits
with status 2 and one line on stderr, loads no model (loading is patched to fail the test), downloads nothing and
writes nothing into its output directory. In-process CLI calls, so the whole table runs in seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ctxaware.cli.main import main


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad_steering.yaml").write_text("alpha: 5\n")
    (tmp_path / "share_steering.yaml").write_text("rule: share\nshare: 1.5\n")
    (tmp_path / "unknown_key.yaml").write_text("alpah: 0.5\n")
    (tmp_path / "bad_needle.yaml").write_text("needle: a needle\n")  # no question, no keywords
    (tmp_path / "not_yaml.yaml").write_text("a: [1, 2\n")
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(40)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "recipe.yaml").write_text("learning_rate: fast\n")
    return tmp_path


def _cases(f: Path) -> list[tuple[str, list[str]]]:
    judge = ["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "j"]
    return [
        # niah
        ("niah", ["--lengths", "abc"]), ("niah", ["--depths", "150"]), ("niah", ["--modes", "chat,weird"]),
        ("niah", ["--batch-size", "0"]), ("niah", ["--alpha", "2"]), ("niah", ["--heads", "x:y"]),
        ("niah", ["--shard", "3/2"]), ("niah", ["--steering", str(f / "missing.yaml")]),
        ("niah", ["--steering", str(f / "bad_steering.yaml")]), ("niah", ["--steering", str(f / "share_steering.yaml")]),
        ("niah", ["--steering", str(f / "unknown_key.yaml")]), ("niah", ["--needle", str(f / "bad_needle.yaml")]),
        ("niah", ["--needle", "no-such-needle"]), ("niah", ["--haystack", str(f / "missing.txt")]),
        ("niah", ["--min-length", "9000", "--max-length", "100"]), ("niah", ["--config", str(f / "not_yaml.yaml")]),
        ("niah", ["--effective-threshold", "0"]), ("niah", ["--device", "tpu:7"]),
        # study
        ("study", ["--lengths", "abc"]), ("study", ["--qa", "nope"]), ("study", ["--attention-depths", "150"]),
        ("study", ["--steering", str(f / "bad_steering.yaml")]), ("study", ["--task", "nope"]),
        ("study", ["--mtbench-judge-url", "http://127.0.0.1:9/v1", "--mtbench-limit", "0"]),
        ("study", ["--modes", "chat+weird"]), ("study", ["--needle", str(f / "bad_needle.yaml")]),
        # mtbench
        ("mtbench", [*judge, "--limit", "0"]), ("mtbench", [*judge, "--steering", str(f / "missing.yaml")]),
        ("mtbench", [*judge, "--steering", str(f / "bad_steering.yaml")]), ("mtbench", [*judge, "--alpha", "3"]),
        ("mtbench", [*judge, "--adapter", str(f)]), ("mtbench", [*judge, "--questions", str(f / "missing.jsonl")]),
        ("mtbench", [*judge, "--heads", "x:y"]), ("mtbench", [*judge, "--judge-concurrency", "0"]),
        # sft-study
        ("sft-study", ["--dataset", str(f / "data.jsonl"), "--lengths", "abc"]),
        ("sft-study", ["--dataset", str(f / "data.jsonl"), "--depths", "150"]),
        ("sft-study", ["--dataset", str(f / "data.jsonl"), "--qa", "nope"]),
        ("sft-study", ["--dataset", str(f / "data.jsonl"), "--needle", str(f / "bad_needle.yaml")]),
        ("sft-study", ["--dataset", str(f / "data.jsonl"), "--recipe", str(f / "recipe.yaml")]),
        ("sft-study", ["--dataset", str(f / "missing.jsonl")]),
        ("sft-study", ["--dataset", str(f / "data.jsonl"), "--attention-depths", "150"]),
        ("sft-study", ["--dataset", str(f / "data.jsonl"), "--modes", "chat+steer"]),
        ("sft-study", ["--dataset", str(f / "data.jsonl"), "--haystack", str(f / "missing.txt")]),
        # calibrate
        ("calibrate", ["--lengths", "abc"]), ("calibrate", ["--alphas", "0.5,2"]), ("calibrate", ["--shares", "1.5"]),
        ("calibrate", ["--needle", str(f / "bad_needle.yaml")]), ("calibrate", ["--instructions", str(f / "x.json")]),
        ("calibrate", ["--head-sets", "nope"]), ("calibrate", ["--haystack", str(f / "missing.txt")]),
        # score / indicate / train / eval / attention / serve
        ("score", ["--in", str(f / "missing.jsonl")]), ("score", ["--in", str(f / "data.jsonl"), "--shard", "5/2"]),
        ("score", ["--in", str(f / "data.jsonl"), "--layer", "abc"]),
        ("score", ["--in", str(f / "data.jsonl"), "--batch-size", "0"]),
        ("indicate", ["--in", str(f / "missing.jsonl")]), ("indicate", ["--in", str(f / "data.jsonl"), "--threshold", "2"]),
        ("train", ["--dataset", str(f / "missing.jsonl")]),
        ("train", ["--dataset", str(f / "data.jsonl"), "--learning-rate", "abc"]),
        ("train", ["--dataset", str(f / "data.jsonl"), "--recipe", "no-such-recipe"]),
        ("eval", ["--tasks", "ctxaware_squad_no_ind", "--limit", "0"]),
        ("eval", ["--tasks", "ctxaware_squad_no_ind", "--steering", str(f / "missing.yaml")]),
        ("eval", ["--tasks", "ctxaware_squad_no_ind", "--alpha", "7"]),
        ("eval", ["--tasks", "ctxaware_squad_no_ind", "--data-dir", str(f / "missing")]),
        ("attention", ["--messages", str(f / "missing.json")]),
        ("attention", ["--messages", str(f / "data.jsonl"), "--layers", "x-y"]),
        ("serve", ["--port", "-5"]), ("serve", ["--steering", str(f / "bad_steering.yaml")]),
        ("serve", ["--max-concurrency", "0"]),
    ]


OUT_OPTION = {"niah": "--out", "study": "--out", "mtbench": "--out", "sft-study": "--out", "calibrate": "--out",
              "score": "--out", "indicate": "--out", "train": "--output-dir", "eval": "--out"}


@pytest.fixture
def no_model(monkeypatch):
    """Model and tokenizer loading fail the test: a refusal must come before them."""
    import transformers

    import ctxaware.models as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    for name in ("load_model", "load_tokenizer", "resolve_model_path"):
        monkeypatch.setattr(models, name, boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    import ctxaware.fsio as fsio
    import ctxaware.mtbench.data as mt_data
    import ctxaware.niah.haystack as haystack

    for module in (fsio, mt_data, haystack):  # nothing is downloaded either
        monkeypatch.setattr(module, "download_files", boom, raising=False)


def test_malformed_options_are_refused_before_any_work(files, no_model, capsys):
    failures = []
    slowest = 0.0
    for command, opts in _cases(files):
        out = files / "out" / command.replace("-", "_")
        argv = [command, *opts]
        if command in OUT_OPTION:
            argv += [OUT_OPTION[command], str(out / ("labelled.jsonl" if command in ("indicate", "score") else ""))]
        capsys.readouterr()
        t0 = time.perf_counter()
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own refusals
            rc = exc.code
        except Exception as exc:  # noqa: BLE001 - a traceback instead of one line is a failure too
            failures.append(f"{' '.join(argv)}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        slowest = max(slowest, time.perf_counter() - t0)
        err = capsys.readouterr().err.strip()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if lines and lines[0].startswith("usage:"):  # argparse: its usage, then the one error line
            lines = lines[-1:]
        written = [str(p) for p in out.rglob("*")] if out.exists() else []
        if rc != 2 or len(lines) != 1 or written:
            failures.append(f"{' '.join(argv)}: rc={rc}, stderr={err[-300:]!r}, written={written[:3]}")
    assert not failures, "\n".join(failures)
    assert slowest < 20
