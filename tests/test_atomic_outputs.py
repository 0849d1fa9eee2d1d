"""Every result file is written atomically or appended with fsync; NIH results are reproducible; checkpoints.

- A static scan of ``src/ctxaware`` (AST, not grep) finds every call that writes a file —
  ``write_text``/``write_bytes``, ``open``/``os.fdopen``/``Path.open`` in a writing mode,
  ``json.dump``/``yaml.dump`` to a stream, ``savefig``, ``save_pretrained``, ``to_parquet``, ... —
  outside ``ctxaware.fsio`` and outside a ``with atomic_write(...)``/``JsonlAppender(...)`` block.
  Each must be in :data:`ALLOWED` with the reason it is safe, and every entry of :data:`ALLOWED`
  must still match a call (a stale entry fails too). A positive control checks the scanner
  flags the patterns it is meant to flag.
- ``fsio``: atomic files get the mode an ordinary ``open`` would give them, a failed write leaves the
  old file, ``atomic_savefig`` writes a real PNG.
- NIH: no wall-clock time in ``results.jsonl`` (it is in ``timings.jsonl``; the summary sums it),
  a study resumed over a bigger grid ends byte-identical to one run straight through, and the file
  is put back in grid order whatever order the lines were in.
- Training resume: which ``checkpoint-*`` directories are complete, and what ``latest``/``auto`` pick.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SRC = Path(__file__).resolve().parents[1] / "src" / "ctxaware"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None

# (file under src/ctxaware, enclosing function, call) -> why that write is crash-safe
ALLOWED: dict[tuple[str, str, str], str] = {
    ("training/trainer.py", "_trainer_class.CtxawareSFTTrainer._save", "save_pretrained"):
        "checkpoint files: the Trainer writes trainer_state.json last and training.checkpoints refuses a "
        "checkpoint without a valid one; the final save_model goes to a staging directory (save_trained)",
    ("training/trainer.py", "_save_tokenizer_atomically", "save_pretrained"):
        "into a temporary directory; each file is fsynced and renamed into place",
    ("training/trainer.py", "save_trained", "save_model"):
        "into the staging directory out/.ctxaware-save.tmp; _move_in fsyncs and renames each file into place",
    ("models.py", "save_pretrained_atomic", "save_pretrained"):
        "into a temporary directory renamed to the cache path in one os.replace",
    ("report/charts.py", "to_uri", "savefig"): "into an in-memory BytesIO (inlined into the HTML page)",
}

WRITE_METHODS = {"write_text", "write_bytes", "savefig", "save_pretrained", "save_model", "to_parquet", "to_csv",
                 "to_json", "write_table", "copy", "copy2", "copyfile", "move"}
STREAM_DUMPS = {("json", "dump"), ("yaml", "dump"), ("yaml", "safe_dump"), ("torch", "save"), ("np", "save"),
                ("numpy", "save"), ("pickle", "dump")}
SAFE_CONTEXTS = {"atomic_write", "JsonlAppender"}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}


def _mode_writes(node: ast.expr | None) -> bool:
    if node is None:
        return False  # open(path): read mode
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return any(c in node.value for c in "wax+")
    return True  # a mode computed at run time: cannot tell, flag it


def _call_kind(call: ast.Call) -> str | None:
    """The kind of file write ``call`` performs, or None."""
    f = call.func
    kw = {k.arg: k.value for k in call.keywords}
    if isinstance(f, ast.Name) and f.id == "open":
        return "open" if _mode_writes(call.args[1] if len(call.args) > 1 else kw.get("mode")) else None
    if not isinstance(f, ast.Attribute):
        return None
    owner = f.value.id if isinstance(f.value, ast.Name) else None
    if f.attr == "fdopen" or (f.attr == "open" and owner == "io"):
        return f.attr if _mode_writes(call.args[1] if len(call.args) > 1 else kw.get("mode")) else None
    if f.attr == "open" and owner == "os":
        flags = {n.attr for a in call.args[1:2] for n in ast.walk(a) if isinstance(n, ast.Attribute)}
        return "os.open" if flags & WRITE_FLAGS else None
    if f.attr == "open":  # Path.open(mode)
        return "open" if _mode_writes(call.args[0] if call.args else kw.get("mode")) else None
    if (owner, f.attr) in STREAM_DUMPS:
        to_stream = len(call.args) > 1 or "stream" in kw or "fp" in kw or "f" in kw
        return f"{owner}.{f.attr}" if to_stream or f.attr == "save" else None
    if f.attr in WRITE_METHODS and not (f.attr in {"copy", "move"} and owner not in ("shutil",)):
        return f.attr
    return None


def _context_name(item: ast.withitem) -> str | None:
    expr = item.context_expr
    if isinstance(expr, ast.Call):
        f = expr.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return None


def scan(source: str) -> list[tuple[str, str, int]]:
    """(enclosing function, call kind, line) of every file write outside a safe ``with`` block."""
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, scope: list[str], safe: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + [node.name]
        if isinstance(node, (ast.With, ast.AsyncWith)) and any(_context_name(i) in SAFE_CONTEXTS for i in node.items):
            safe = True
        if isinstance(node, ast.Call) and not safe:
            kind = _call_kind(node)
            if kind:
                found.append((".".join(scope) or "<module>", kind, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, safe)

    visit(ast.parse(source), [], False)
    return found


def _src_writes() -> dict[tuple[str, str, str], list[int]]:
    out: dict[tuple[str, str, str], list[int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "fsio.py":  # the module that implements the safe writes
            continue
        for func, kind, line in scan(path.read_text(encoding="utf-8")):
            out.setdefault((rel, func, kind), []).append(line)
    return out


def test_scanner_flags_in_place_writes_and_not_safe_ones():
    bad = '''
def f(p, d, fig, fh):
    Path(p).write_text("x")
    open(p, "w").write("x")
    with open(p, mode="ab") as g:
        json.dump(d, g)
    fig.savefig(p)
    p.open("w")
    os.fdopen(3, "w")
    yaml.safe_dump(d, fh)
    torch.save(d, p)
    model.save_pretrained(p)
    df.to_parquet(p)
    os.open(p, os.O_WRONLY | os.O_CREAT)
'''
    kinds = [k for _, k, _ in scan(bad)]
    assert kinds == ["write_text", "open", "open", "json.dump", "savefig", "open", "fdopen", "yaml.safe_dump",
                     "torch.save", "save_pretrained", "to_parquet", "os.open"]
    good = '''
def g(p, d, fig):
    open(p).read()
    open(p, "rb")
    Path(p).open()
    text = json.dumps(d)
    yaml.safe_dump(d, sort_keys=False)
    os.open(p, os.O_RDONLY)
    with atomic_write(p, "wb") as fh:
        fig.savefig(fh)
        json.dump(d, fh)
    with JsonlAppender(p) as app:
        app.write(d)
'''
    assert scan(good) == []


def test_every_file_write_in_src_is_atomic_appended_with_fsync_or_justified():
    found = _src_writes()
    unexplained = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not unexplained, ("in-place file writes: use ctxaware.fsio (atomic_write_text/json/jsonl, atomic_savefig, "
                             "atomic_write, JsonlAppender) or add a reason to ALLOWED: "
                             + "; ".join(f"{f}:{lines} {fn} {kind}" for (f, fn, kind), lines in unexplained.items()))
    stale = sorted(k for k in ALLOWED if k not in found)
    assert not stale, f"ALLOWED entries that match no call any more (remove them): {stale}"


def test_atomic_files_get_the_umask_mode_and_a_failed_write_keeps_the_old_file(tmp_path):
    from ctxaware.fsio import atomic_write, atomic_write_text

    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    atomic_write_text(atomic, "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    with pytest.raises(RuntimeError):
        with atomic_write(atomic) as fh:
            fh.write("half a new file")
            raise RuntimeError("killed")
    assert atomic.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.txt", "plain.txt"]  # no temp file left


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_atomic_savefig_writes_a_png_and_leaves_no_temp_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctxaware.fsio import atomic_savefig

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    out = atomic_savefig(fig, tmp_path / "sub" / "plot.png", dpi=50)
    plt.close(fig)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["plot.png"]


# ---- NIH: results.jsonl holds results only, and ends the same however the run was split ----

@pytest.fixture(scope="module")
def tiny():
    from test_niah_runner import tiny_model
    from test_niah_unit import tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_model(len(tok)), tok


def _niah(out: Path, tiny, lengths: str, **kw):
    from ctxaware.niah import NiahConfig, run_niah

    cfg = NiahConfig(lengths=lengths, depths="0,50,100", modes="raw,chat", max_new_tokens=4, out=str(out),
                     progress=False, **kw)
    return run_niah(cfg, model=tiny[0], tokenizer=tiny[1], model_name="tiny", plot=False)


def test_niah_timings_are_kept_out_of_the_results_and_summed_in_the_summary(tiny, tmp_path):
    from ctxaware.niah.results import read_timings

    run = _niah(tmp_path, tiny, "200")
    results = (tmp_path / "results.jsonl").read_bytes()
    assert b'"seconds"' not in results
    timings = read_timings(tmp_path)
    assert set(timings) == {r["key"] for r in run.records} and all(t > 0 for t in timings.values())
    summary = json.loads((tmp_path / "summary.json").read_text())["modes"]
    for mode, s in summary.items():
        assert s["seconds"] == pytest.approx(sum(timings[r["key"]] for r in run.records if r["mode"] == mode))


def test_niah_resumed_over_a_bigger_grid_is_byte_identical_and_in_grid_order(tiny, tmp_path):
    straight = _niah(tmp_path / "straight", tiny, "200,320")
    _niah(tmp_path / "split", tiny, "320")  # the second half first: lines appended out of grid order
    split = _niah(tmp_path / "split", tiny, "200,320")
    assert split.new_cells == 6
    want = (tmp_path / "straight" / "results.jsonl").read_bytes()
    assert (tmp_path / "split" / "results.jsonl").read_bytes() == want
    assert [r["key"] for r in split.records] == [r["key"] for r in straight.records]
    lines = want.splitlines(keepends=True)
    random.Random(0).shuffle(lines)  # any order (e.g. cells of a batched run finishing out of turn)
    (tmp_path / "split" / "results.jsonl").write_bytes(b"".join(lines))
    assert _niah(tmp_path / "split", tiny, "200,320").new_cells == 0
    assert (tmp_path / "split" / "results.jsonl").read_bytes() == want


def test_niah_summary_reads_seconds_of_older_records(tmp_path):
    from ctxaware.niah.results import write_summary

    recs = [{"key": f"k{i}", "mode": "chat", "recall": 1.0, "tokens": 10, "length": 100, "depth": 0.0,
             "seconds": 1.5} for i in range(2)]
    assert write_summary(tmp_path, recs)["chat"]["seconds"] == pytest.approx(3.0)
    (tmp_path / "timings.jsonl").write_text(json.dumps({"key": "k0", "seconds": 0.25}) + "\n")
    assert write_summary(tmp_path, recs)["chat"]["seconds"] == pytest.approx(1.75)  # timings.jsonl wins


# ---- training: complete checkpoints, and what resume picks ----

def _checkpoint(out: Path, step: int, state: str | None) -> Path:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    if state is not None:
        (d / "trainer_state.json").write_text(state)
    return d


def test_resume_picks_the_newest_complete_checkpoint_and_drops_half_written_ones(tmp_path):
    from ctxaware.errors import ConfigError
    from ctxaware.training.checkpoints import checkpoint_complete, last_complete_checkpoint, resume_checkpoint
    from ctxaware.training.config import TrainConfig

    out = tmp_path / "out"
    good = _checkpoint(out, 2, json.dumps({"global_step": 2}))
    full = json.dumps({"global_step": 3, "log_history": [{"loss": 1.0}] * 5})
    torn = _checkpoint(out, 3, full[: len(full) // 2])  # killed while writing trainer_state.json
    bare = _checkpoint(out, 10, None)  # killed before it
    wrong = _checkpoint(tmp_path / "other", 4, json.dumps({"global_step": 3}))
    assert checkpoint_complete(good) and not checkpoint_complete(torn) and not checkpoint_complete(bare)
    assert not checkpoint_complete(wrong)
    assert last_complete_checkpoint(out) == good and torn.is_dir()  # skipped, kept
    cfg = TrainConfig(output_dir=str(out), resume_from_checkpoint="latest")
    assert resume_checkpoint(cfg) == str(good)
    assert not torn.exists() and not bare.exists()  # removed: the resumed run writes them again
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        resume_checkpoint(TrainConfig(output_dir=str(out), resume_from_checkpoint=str(wrong)))
    empty = tmp_path / "empty"
    _checkpoint(empty, 1, None)
    assert resume_checkpoint(TrainConfig(output_dir=str(empty), resume_from_checkpoint="auto")) is None
    with pytest.raises(ConfigError, match="no checkpoint"):
        resume_checkpoint(TrainConfig(output_dir=str(empty), resume_from_checkpoint="latest"))
    assert resume_checkpoint(TrainConfig(output_dir=str(out))) is None
    assert os.listdir(empty) == []
