"""Fuzz (hypothesis) over every input ctxaware reads: each works or fails with one clear line, exit 2.

Inputs: message files (JSON/JSONL: missing/unknown roles, non-string and list-of-parts content,
empty turns, consecutive same roles, BOM, invalid UTF-8, NaN, truncation), datasets (HF
``messages``, ShareGPT ``conversations``, Alpaca ``instruction``/``input``/``output``; JSONL, JSON,
parquet; hub names offline), needle files, recipes/configs (unknown keys, wrong types), steering
files and head specs, and CLI numbers out of range. CLI cases run in-process through
``ctxaware.cli.main.main`` with the tiny model of ``test_measure_models``. Properties:

- exit status 0, or 2 with exactly one ``error:`` line on stderr and no traceback;
- after exit 2 no output file exists (nothing that looks complete but is not); after exit 0 the
  output has one row per input row;
- library readers return a value or raise a :class:`~ctxaware.errors.CtxawareError` — nothing else.

With ``CTXAWARE_FUZZ_TABLE=path.md`` the outcome counts per command are written there (the table of
docs/reliability.md is made that way).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_measure_models import tiny_model, tiny_tokenizer

from ctxaware.errors import CtxawareError

torch.set_num_threads(1)

OUTCOMES: Counter = Counter()
SETTINGS = settings(max_examples=int(os.environ.get("CTXAWARE_FUZZ_EXAMPLES", "25")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                    derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    target = os.environ.get("CTXAWARE_FUZZ_TABLE")
    if not target:
        return
    commands = sorted({c for c, _ in OUTCOMES})
    lines = ["| input / command | tried | works | clear error (exit 2) | traceback / other |", "|---|---|---|---|---|"]
    for c in commands:
        ok, err, bad = OUTCOMES[(c, "ok")], OUTCOMES[(c, "error")], OUTCOMES[(c, "crash")]
        lines.append(f"| {c} | {ok + err + bad} | {ok} | {err} | {bad} |")
    Path(target).write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", vocab=len(tok))
    root = tmp_path_factory.mktemp("fuzz_model")
    tok.save_pretrained(root / "m")
    return model, tok, root / "m"


def _cli(argv, capsys, command, mp=None, tiny=None):
    """Run the CLI in-process; assert the contract; record the outcome; return (code, stdout)."""
    from ctxaware.cli.main import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects the option: usage + one error line, exit 2
        code = exc.code
    except BaseException:
        OUTCOMES[(command, "crash")] += 1
        raise
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    if code not in (0, 2) or "Traceback" in err or (code == 2 and len(errors) != 1):
        OUTCOMES[(command, "crash")] += 1
        raise AssertionError(f"exit {code}, stderr: {err[-1500:]}")
    OUTCOMES[(command, "ok" if code == 0 else "error")] += 1
    return code, out


def _lib(fn, command):
    """Call a library reader: a value, or a CtxawareError (one line)."""
    try:
        value = fn()
    except CtxawareError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        OUTCOMES[(command, "error")] += 1
        return None
    except BaseException:
        OUTCOMES[(command, "crash")] += 1
        raise
    OUTCOMES[(command, "ok")] += 1
    return value


# ------------------------------------------------------------------ strategies
ROLES = st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "chatgpt", "bing", "bard",
                                   "model", "Human", " GPT ", "narrator", "tool", ""]),
                  st.integers(), st.none())
TEXT = st.text(max_size=24)
PART = st.one_of(TEXT, st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT}))
CONTENT = st.one_of(TEXT, TEXT, st.none(), st.integers(), st.floats(allow_nan=True), st.lists(PART, max_size=3),
                    st.dictionaries(TEXT, TEXT, max_size=2))
MESSAGE = st.one_of(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}),
                    st.fixed_dictionaries({"from": ROLES, "value": CONTENT}),
                    st.fixed_dictionaries({"role": ROLES}), TEXT, st.integers())
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "human", "gpt"]),
                                      "content": TEXT})
CONVERSATION = st.one_of(st.lists(MESSAGE, max_size=4), st.lists(GOOD_MESSAGE, min_size=1, max_size=4),
                         st.fixed_dictionaries({"messages": st.lists(GOOD_MESSAGE, max_size=4)}),
                         st.fixed_dictionaries({"conversations": st.lists(MESSAGE, max_size=3)}), TEXT, st.integers())
MUTATION = st.sampled_from(["none", "none", "bom", "invalid_utf8", "truncate", "empty", "nan"])


def _encode(obj, mutation: str) -> bytes:
    data = json.dumps(obj, allow_nan=True).encode("utf-8")
    if mutation == "bom":
        return b"\xef\xbb\xbf" + data
    if mutation == "invalid_utf8":
        return data[: len(data) // 2] + b"\xff\xfe" + data[len(data) // 2:]
    if mutation == "truncate":
        return data[: max(1, len(data) // 2)]
    if mutation == "empty":
        return b""
    if mutation == "nan":
        return data.replace(b"]", b", NaN]", 1)  # a bare NaN where a message is expected
    return data


# ------------------------------------------------------------------ message files: spans
@SETTINGS
@given(conv=CONVERSATION, mutation=MUTATION, jsonl=st.booleans())
def test_fuzz_spans_messages_file(tiny, tmp_path, capsys, conv, mutation, jsonl):
    _, _, model_dir = tiny
    path = tmp_path / ("m.jsonl" if jsonl else "m.json")
    if jsonl and isinstance(conv, list) and mutation == "none":
        path.write_text("".join(json.dumps(m) + "\n" for m in conv), encoding="utf-8")
    else:
        path.write_bytes(_encode(conv, mutation))
    code, out = _cli(["spans", "--messages", str(path), "--model", str(model_dir), "--json"], capsys,
                     "spans --messages (JSON/JSONL)")
    if code == 0:
        data = json.loads(out)
        assert len(data["roles"]) == len(data["input_ids"]) and data["spans"]


def test_huge_messages_file_is_refused(tiny, tmp_path, capsys):
    _, _, model_dir = tiny
    path = tmp_path / "huge.json"
    with open(path, "wb") as fh:
        fh.truncate(65 * 1024 * 1024)  # sparse: 65 MiB without writing them
    code, _ = _cli(["spans", "--messages", str(path), "--model", str(model_dir)], capsys, "spans --messages (JSON/JSONL)")
    assert code == 2


# ------------------------------------------------------------------ datasets: score / indicate
ALPACA = st.fixed_dictionaries({"instruction": st.one_of(TEXT, st.integers()), "input": TEXT,
                                "output": st.one_of(TEXT, st.none())})
ROW = st.one_of(st.fixed_dictionaries({"messages": st.lists(st.one_of(GOOD_MESSAGE, MESSAGE), max_size=4)}),
                st.fixed_dictionaries({"conversations": st.lists(MESSAGE, max_size=4)}),
                st.fixed_dictionaries({"messages": st.lists(GOOD_MESSAGE, min_size=2, max_size=4)}),
                ALPACA, st.dictionaries(TEXT, TEXT, max_size=2), st.integers(), TEXT)


def _patch_model(mp, tiny):
    model, tok, _ = tiny
    from ctxaware.models import LoadedModel

    loaded = LoadedModel(model=model, tokenizer=tok, name="tiny")
    mp.setattr("ctxaware.models.load_model", lambda *a, **k: loaded)


@SETTINGS
@given(rows=st.lists(ROW, min_size=1, max_size=5), fmt=st.sampled_from(["jsonl", "json", "parquet"]),
       mutation=st.sampled_from(["none", "none", "none", "bom", "invalid_utf8", "torn"]))
def test_fuzz_score_datasets(tiny, tmp_path, capsys, rows, fmt, mutation):
    src, out = tmp_path / f"data.{fmt}", tmp_path / "scored.jsonl"
    out.unlink(missing_ok=True)
    (tmp_path / "scored.jsonl.partial.jsonl").unlink(missing_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.write_table(pa.Table.from_pylist([r if isinstance(r, dict) else {"value": r} for r in rows]), src)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            src.write_bytes(b"PAR1 not really parquet")
    else:
        data = ("".join(json.dumps(r) + "\n" for r in rows) if fmt == "jsonl" else json.dumps(rows)).encode()
        if mutation == "bom":
            data = b"\xef\xbb\xbf" + data
        elif mutation == "invalid_utf8":
            data = b"\xc3\x28" + data
        elif mutation == "torn":
            data = data[: max(1, len(data) * 2 // 3)]
        src.write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        _patch_model(mp, tiny)
        code, _ = _cli(["score", "--in", str(src), "--out", str(out), "--no-progress", "--batch-size", "2"], capsys,
                       f"score --in (.{fmt})")
    if code == 0:
        scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        from ctxaware.scoring import read_rows

        assert len(scored) == len(read_rows(src)) and all("ctx_scores" in r for r in scored)
    else:
        assert not out.exists()


@pytest.mark.parametrize("name", ["no-such-org/no-such-dataset-xyz", "squad_v9_missing", "./missing.jsonl",
                                  "/nowhere/data.parquet"])
def test_hub_names_offline_fail_clearly(tiny, tmp_path, capsys, monkeypatch, name):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    _patch_model(monkeypatch, tiny)
    out = tmp_path / "o.jsonl"
    code, _ = _cli(["score", "--in", name, "--out", str(out), "--no-progress"], capsys, "score --in (hub name offline)")
    assert code == 2 and not out.exists()


@pytest.mark.parametrize("layout", ["empty_dir", "junk_dir", "saved_dataset"])
def test_dataset_directories(tiny, tmp_path, capsys, monkeypatch, layout):
    """A directory is read with ``datasets`` (save_to_disk, or a data folder); one that cannot be read
    fails in one line; a saved dataset is scored."""
    d = tmp_path / "ds"
    d.mkdir()
    if layout == "junk_dir":
        (d / "notes.bin").write_bytes(b"\x00\x01junk")
    elif layout == "saved_dataset":
        import datasets

        datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello"}]}]).save_to_disk(str(d))
    _patch_model(monkeypatch, tiny)
    out = tmp_path / "o.jsonl"
    code, _ = _cli(["score", "--in", str(d), "--out", str(out), "--no-progress"], capsys, "score --in (directory)")
    assert code == (0 if layout == "saved_dataset" else 2) and out.exists() == (code == 0)


@pytest.mark.parametrize("argv", [["--tasks", "no_such_task_xyz"], ["--tasks", ""], ["--tasks", "ctxaware_squad_ind",
                                  "--limit", "-1"], ["--tasks", "ctxaware_squad_ind", "--alpha", "2"],
                                  ["--tasks", "ctxaware_squad_ind", "--steering", "/nowhere/s.yaml"]],
                         ids=lambda a: " ".join(a))
def test_eval_bad_options(tiny, tmp_path, capsys, monkeypatch, argv):
    _patch_model(monkeypatch, tiny)
    code, _ = _cli(["eval", *argv, "--out", str(tmp_path / "e")], capsys, "eval options")
    assert code == 2 and not (tmp_path / "e" / "results.json").exists()


SCORES = st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(allow_nan=True), TEXT), max_size=3), TEXT)


@SETTINGS
@given(rows=st.lists(st.fixed_dictionaries({"messages": st.lists(GOOD_MESSAGE, min_size=1, max_size=4),
                                            "ctx_scores": SCORES}), min_size=1, max_size=4),
       threshold=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["abc", "0.6", "-1"])))
def test_fuzz_indicate(tmp_path, capsys, rows, threshold):
    src, out = tmp_path / "scored.jsonl", tmp_path / "labelled.jsonl"
    out.unlink(missing_ok=True)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, _ = _cli(["indicate", "--in", str(src), "--out", str(out), "--threshold", str(threshold)], capsys,
                   "indicate --in/--threshold")
    if code != 0:
        assert not out.exists()


# ------------------------------------------------------------------ needles, configs, steering files
NEEDLE_VALUE = st.one_of(TEXT, st.integers(), st.none(), st.lists(TEXT, max_size=3))


@SETTINGS
@given(data=st.one_of(st.fixed_dictionaries({"needle": st.just("The key is under the red mat."),
                                             "question": st.just("Where is the key?"),
                                             "keywords": st.lists(st.sampled_from(["mat.", "Red", "key", "MAT",
                                                                                   "under the", "?"]),
                                                                  min_size=1, max_size=3)}),
                      st.fixed_dictionaries({"needle": st.one_of(TEXT, st.just("The key is under the red mat.")),
                                             "question": st.one_of(st.just("Where is the key?"), NEEDLE_VALUE),
                                             "keywords": st.one_of(st.lists(st.sampled_from(
                                                 ["mat.", "Red", "key", "under the", "", "?", "MAT"]), max_size=3),
                                                 NEEDLE_VALUE)}),
                      st.dictionaries(st.sampled_from(["needle", "question", "keywords", "name", "extra"]),
                                      NEEDLE_VALUE, max_size=4), TEXT, st.integers()),
       suffix=st.sampled_from([".json", ".yaml"]))
def test_fuzz_needle_files(tmp_path, data, suffix):
    import yaml

    from ctxaware.niah.needles import load_needle
    from ctxaware.niah.scoring import recall

    path = tmp_path / f"needle{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data), encoding="utf-8")
    needle = _lib(lambda: load_needle(str(path)), "needle file (niah --needle)")
    if needle is not None:  # a needle that validates can always be found in its own text
        assert recall(needle.needle, needle.keywords) == 1.0


WORD = st.text(alphabet="abcdefghijKLMNOP", min_size=1, max_size=6)


@SETTINGS
@given(words=st.lists(WORD, min_size=2, max_size=8), picks=st.lists(st.integers(0, 7), min_size=1, max_size=3),
       decor=st.lists(st.sampled_from(["", ".", ",", "!", "?", "'", "\"", "(", ")"]), min_size=3, max_size=3))
def test_keywords_that_validate_always_score(words, picks, decor):
    """Validation and recall share one normaliser: any keyword accepted recalls its own needle."""
    from ctxaware.niah.needles import Needle
    from ctxaware.niah.scoring import recall

    sentence = " ".join(w + decor[i % 3] for i, w in enumerate(words))
    keywords = tuple(decor[2] + words[p % len(words)].upper() + decor[0] for p in picks)
    needle = _lib(lambda: Needle("n", sentence, "Which words?", keywords), "needle keywords (validation = recall)")
    assert needle is not None
    assert recall(sentence, needle.keywords) == 1.0
    assert recall(sentence.upper() + " !", needle.keywords) == 1.0


def test_custom_keyword_with_punctuation_scores():
    from ctxaware.niah.needles import Needle
    from ctxaware.niah.scoring import recall

    n = Needle("mat", "The key is under the red mat.", "Where is the key?", ("red", "mat."))
    assert recall("The key is under the red mat.", n.keywords) == 1.0
    assert recall("It is under the mat", n.keywords) == 0.5


CONFIG_VALUE = st.one_of(TEXT, st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                         st.lists(st.integers(), max_size=2))


@SETTINGS
@given(data=st.one_of(st.dictionaries(st.sampled_from(["alpha", "heads", "emphasis", "compounding", "rule",
                                                        "target_share", "bogus", "_calibration"]),
                                      CONFIG_VALUE, max_size=4), CONFIG_VALUE),
       suffix=st.sampled_from([".yaml", ".json"]), raw=st.sampled_from([None, b"\xff\xfe", b"a: [1,\n", b"- x\n"]))
def test_fuzz_steering_files(tmp_path, data, suffix, raw):
    from ctxaware.steering.file import load_steering_file

    path = tmp_path / f"steer{suffix}"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(data, allow_nan=True), encoding="utf-8")  # JSON is YAML too
    _lib(lambda: load_steering_file(path), "steering file (--steering)")


@SETTINGS
@given(spec=st.one_of(TEXT, st.sampled_from(["all", "0-1", "1:0,2", "3", "40", "-1", "0-99", "1:9", "a-b",
                                             "0:0-1;1:2", "{}", ""]),
                      st.integers(-3, 50), st.dictionaries(st.integers(-1, 5), st.one_of(st.none(), st.lists(
                          st.integers(-1, 5), max_size=2)), max_size=2)))
def test_fuzz_head_specs(spec):
    from ctxaware.steering.config import SteeringConfig

    config = _lib(lambda: SteeringConfig(heads=spec), "head spec (--heads)")
    if config is not None:  # resolving against a 4-layer, 4-head model works or refuses clearly
        resolved = _lib(lambda: config.resolve_heads(4, 4), "head spec (--heads)")
        if resolved is not None:
            assert all(0 <= layer < 4 and (h is None or all(0 <= x < 4 for x in h)) for layer, h in resolved.items())


TRAIN_KEYS = ["model", "dataset", "output_dir", "learning_rate", "num_train_epochs", "max_length", "lora_r",
              "indicator", "bogus_key", "per_device_train_batch_size", "seed"]


@SETTINGS
@given(data=st.one_of(st.dictionaries(st.sampled_from(TRAIN_KEYS), CONFIG_VALUE, max_size=4), CONFIG_VALUE),
       suffix=st.sampled_from([".yaml", ".json"]))
def test_fuzz_train_recipes(tmp_path, capsys, data, suffix):
    path = tmp_path / f"recipe{suffix}"
    path.write_text(json.dumps(data, allow_nan=True), encoding="utf-8")
    _cli(["train", "--config", str(path), "--print-config"], capsys, "train --config (recipe)")


@SETTINGS
@given(data=st.one_of(st.dictionaries(st.sampled_from(["lengths", "depths", "modes", "alpha", "max_new_tokens",
                                                        "batch_size", "needle", "bogus"]), CONFIG_VALUE, max_size=4),
                      CONFIG_VALUE))
def test_fuzz_niah_configs(tmp_path, data):
    import argparse

    from ctxaware.cli.options import config_from_args
    from ctxaware.niah.config import NiahConfig

    path = tmp_path / "niah.yaml"
    path.write_text(json.dumps(data, allow_nan=True), encoding="utf-8")
    _lib(lambda: config_from_args(NiahConfig, argparse.Namespace(config=str(path))), "niah --config")


# ------------------------------------------------------------------ CLI numbers out of range
BAD_NUMBERS = [
    ["niah", "--lengths", "-5"], ["niah", "--lengths", "0"], ["niah", "--lengths", "abc"],
    ["niah", "--lengths", "9000000"], ["niah", "--depths", "150"], ["niah", "--depths", "-1"],
    ["niah", "--alpha", "0"], ["niah", "--alpha", "1.5"], ["niah", "--alpha", "nan"],
    ["niah", "--max-new-tokens", "0"], ["niah", "--batch-size", "0"], ["niah", "--modes", "chat,chat+steer", "--heads", "40"],
    ["score", "--batch-size", "0"], ["score", "--batch-size", "-3"], ["score", "--shard", "3/2"],
    ["indicate", "--threshold", "nan"], ["chat", "hi", "--max-new-tokens", "-1"], ["chat", "hi", "--alpha", "0"],
    ["chat", "hi", "--alpha", "inf"],
]


@pytest.mark.parametrize("argv", BAD_NUMBERS + [["niah"], ["score"], ["indicate"], ["chat", "hi"]],
                         ids=lambda a: " ".join(a))
def test_cli_numbers_out_of_range_exit_2_before_work(tiny, tmp_path, capsys, monkeypatch, argv):
    """Each bad number exits 2 with its one line; the same command without it (the control) exits 0."""
    _patch_model(monkeypatch, tiny)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}], "ctx_scores": [0.7]}) + "\n")
    extra = {"niah": ["--lengths", "200", "--depths", "50", "--modes", "chat", "--max-new-tokens", "2",
                      "--out", str(tmp_path / "n"), "--no-progress"],
             "score": ["--in", str(data), "--out", str(tmp_path / "s.jsonl"), "--no-progress"],
             "indicate": ["--in", str(data), "--out", str(tmp_path / "l.jsonl")],
             "chat": ["--max-new-tokens", "2"]}[argv[0]]
    # the option under test comes last, so it wins over the defaults in `extra`
    control = len(argv) == 1 or argv == ["chat", "hi"]
    code, _ = _cli([argv[0], *extra, *argv[1:]], capsys,
                   f"{argv[0]} numbers (valid control)" if control else f"{argv[0]} numbers out of range")
    if control:
        assert code == 0
        return
    assert code == 2
    assert not (tmp_path / "n" / "results.jsonl").exists() or not (tmp_path / "n" / "results.jsonl").read_bytes()
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "l.jsonl").exists()

