"""ctxaware.fsio: a file cut at any byte reads back as a prefix of its records; atomic writes are all-or-nothing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxaware.errors import InputError
from ctxaware.fsio import JsonlAppender, atomic_write_json, atomic_write_text, read_jsonl, repair_jsonl

RECORD = st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=12), st.integers(), st.none()), max_size=3)
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(records=st.lists(RECORD, min_size=1, max_size=6), cut=st.floats(0, 1), pad=st.booleans())
def test_a_file_cut_anywhere_reads_as_a_prefix_and_appends_cleanly(tmp_path, records, cut, pad):
    path = tmp_path / "r.jsonl"
    path.unlink(missing_ok=True)
    with JsonlAppender(path) as app:
        for r in records:
            app.write(r)
    data = path.read_bytes()
    torn = data[: int(len(data) * cut)] + (b"\0\0\n" if pad else b"")  # a kill mid-write (+ NUL padding)
    path.write_bytes(torn)
    got = read_jsonl(path, repair=True)
    assert got == records[: len(got)]
    assert path.read_bytes() == b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in got)
    with JsonlAppender(path) as app:  # resume: appends start on a clean line
        app.write({"resumed": True})
    assert read_jsonl(path) == got + [{"resumed": True}]


def test_corruption_before_the_last_line_is_reported_not_skipped(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"r.jsonl:2: corrupt line"):
        read_jsonl(path)
    assert repair_jsonl(path) == 0  # only a torn *last* line is repaired


def test_atomic_write_is_all_or_nothing(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        from ctxaware.fsio import atomic_write

        with atomic_write(path) as fh:
            fh.write('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
