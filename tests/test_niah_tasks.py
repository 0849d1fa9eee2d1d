"""NIH tasks beyond one needle: file format and its one-line errors, the literal-free property, placement of
several sentences, distraction and recall counted from the answers, effective length."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from test_study import tiny  # noqa: F401 (the tiny model and tokenizer fixture)

from ctxaware.cli.main import main
from ctxaware.errors import ConfigError
from ctxaware.niah import NEEDLES, Haystack, NiahConfig, load_needle, read_records, run_niah
from ctxaware.niah.haystack import CORPUS_DIR, context_budget
from ctxaware.niah.needles import builtin_needles, needle_from_dict
from ctxaware.niah.prompts import build_messages
from ctxaware.niah.scoring import effective_length, normalize_words
from ctxaware.niah.tasks import LITERAL_FREE, TASKS

torch.set_num_threads(1)

# an independent stopword list (function words, auxiliaries and question words), not taken from ctxaware
STOPWORDS = set("""a an the and or but if of at by for with about against between into through during before after
above below to from up down in out on off over under again further then once here there when where why how all any
both each few more most other some such no nor not only own same so than too very can will just should now is are
was were be been being have has had having do does did doing i me my we our you your he him his she her it its they
them their what which who whom this that these those am would could must shall may might let actually every last
right""".split())


def content_words(text: str) -> set[str]:
    return {w for w in normalize_words(text) if w not in STOPWORDS}


def test_literal_free_questions_share_no_content_word_with_their_needles():
    assert len(LITERAL_FREE) >= 5
    for needle, question, keyword, prefix in LITERAL_FREE:
        n, q = content_words(needle), content_words(question)
        assert n and q
        assert not n & q, (needle, question, n & q)
        assert not {w[:5] for w in n if len(w) >= 5} & {w[:5] for w in q if len(w) >= 5}  # nor a shared stem
        assert not n & content_words(prefix)  # the +prefix opening gives nothing of the needle away
        assert keyword.lower() in normalize_words(needle) and keyword.lower() not in normalize_words(question)
    names = [n for n in TASKS if n.startswith("literal-free")]
    assert len(names) == len(LITERAL_FREE) and TASKS["literal-free"].needle == LITERAL_FREE[0][0]


def test_builtin_tasks_round_trip_and_hide_nothing_in_the_haystack(tmp_path):
    corpus = {w for f in CORPUS_DIR.glob("*.txt") for w in normalize_words(f.read_text())}
    for name, task in TASKS.items():
        assert load_needle(name, None) is task and not task.single and task.name == name
        assert load_needle(name) == task.phrased(0) and load_needle(name).questions == ()
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(task.to_dict()))
        assert load_needle(str(path), None) == task and load_needle(str(path) + "@q2") == task.phrased(2)
        words = {k.lower() for k in task.keywords} | {v for d in task.distractors for v in d.values}
        assert not words & corpus, name  # an answer can only recall them from the inserted sentences
    assert len(TASKS["multi-key"].distractors) == 3 and len(TASKS["multi-key"].keywords) == 1
    assert len(TASKS["multi-value"].texts) == len(TASKS["multi-value"].keywords) == 3
    assert len(TASKS["multi-query"].texts) == 2
    # the old format is still exactly the old needle: same dict, same digest as before this change
    sf = load_needle("SF")  # what runs ask by default: the first phrasing, without the others
    assert sf.single and set(sf.to_dict()) == {"name", "needle", "question", "keywords"}
    old = {"name": "SF", "needle": NEEDLES["SF"].needle, "question": NEEDLES["SF"].question,
           "keywords": list(NEEDLES["SF"].keywords)}
    assert sf.digest == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert set(builtin_needles()) == set(NEEDLES) | set(TASKS)


@pytest.mark.parametrize("data, key", [
    ({"needles": "one sentence", "question": "Q?", "keywords": ["one"]}, "needles"),
    ({"needle": "A cat.", "needles": ["A cat."], "question": "Q?", "keywords": ["cat"]}, "not both"),
    ({"needles": ["A cat.", "A dog."], "question": "Q?", "keywords": ["cow"]}, "keyword 'cow'"),
    ({"needle": "A cat.", "question": "Q?", "keywords": ["cat"], "offsets": [0.5, 0.2]}, "offsets"),
    ({"needle": "A cat.", "question": "Q?", "keywords": ["cat"], "offsets": [2]}, "offsets"),
    ({"needle": "A cat.", "question": "Q?", "keywords": ["cat"], "distractors": ["A dog."]}, "distractors[0]"),
    ({"needle": "A cat.", "question": "Q?", "keywords": ["cat"], "distractors": [{"text": "A dog."}]},
     "distractors[0]"),
    ({"needle": "A cat.", "question": "Q?", "keywords": ["cat"],
      "distractors": [{"text": "A dog.", "values": ["cow"]}]}, "'distractors[0]' value 'cow'"),
    ({"needle": "A cat and a dog.", "question": "Q?", "keywords": ["cat"],
      "distractors": [{"text": "A dog.", "values": ["dog"]}]}, "'distractors[0]' value 'dog'"),
    ({"needle": "A cat.", "question": "Q?", "keywords": ["cat"], "distractors": [{"text": "A cat.", "values": []}]},
     "distractors[0]"),
    ({"needle": "A cat.", "question": "Q?", "keywords": ["cat"], "prefix": ""}, "prefix"),
    ({"needle": "A cat.", "question": "Q?", "keywords": ["cat"], "distractor": []}, "unknown key(s) distractor"),
])
def test_bad_task_files_refused_with_one_line_naming_the_key(tmp_path, capsys, data, key):
    with pytest.raises(ConfigError) as err:
        needle_from_dict(data, name="bad")
    assert key in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["niah", "--needle", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "o").exists()  # refused before anything is written or loaded


def test_sentences_placed_in_order_within_budget(tiny):
    _, tok = tiny
    hay = Haystack("builtin", tok)
    task = TASKS["multi-key"]
    for depth in (0, 40, 100):
        p = hay.place_task(task, 900, depth, reserve=200)
        at = [p.text.index(t) for t in task.inserts]
        assert at == sorted(at)  # needle first, then the distractors, spread towards the end
        assert list(p.positions) == sorted(p.positions) and p.positions[0] == p.needle_token_index
        assert p.positions[0] <= p.haystack_tokens * depth / 100 + 1
        assert abs(len(tok.encode(p.text)) - context_budget(900, 200)) <= 2 * len(task.inserts) + 2
        if depth == 100:
            assert p.text.endswith(" ".join(task.inserts))
    # explicit offsets: the same sentences, where the file says
    moved = needle_from_dict({**task.to_dict(), "offsets": [0.9, 0.0, 0.3, 0.6]}, name="moved")
    p = hay.place_task(moved, 900, 0, reserve=200)
    assert p.text.index(task.needle) > max(p.text.index(d.text) for d in task.distractors)
    # a single needle goes where it always went
    sf = NEEDLES["SF"]
    assert hay.place_task(sf, 700, 50) == hay.place(sf.needle, 700, 50)


def test_ind_and_prefix_keep_the_task():
    task = TASKS["multi-query"]
    ind = task.with_indicator()
    assert ind.question.endswith("[IND]") and ind.texts == task.texts and ind.keywords == task.keywords
    msgs = build_messages("ctx", task, "chat+prefix+ind")
    assert msgs[-1] == {"role": "assistant", "content": task.answer_prefix}
    assert TASKS["multi-key"].prefix == "The special magic number for the ruby lantern is"


def test_effective_length_is_the_last_length_of_the_passing_run():
    def rows(means):
        return [{"length": L, "recall": m} for L, m in means]
    assert effective_length(rows([(1000, 0.9), (3000, 0.8), (5000, 0.95)])) == 1000
    assert effective_length(rows([(1000, 0.5), (3000, 1.0)])) is None
    assert effective_length(rows([(1000, 0.9), (3000, 0.85)])) == 3000
    assert effective_length(rows([(1000, 0.9), (3000, 0.85)]), threshold=0.9) == 1000
    # the mean is over depths: (1 + 0.6) / 2 = 0.8 < 0.85
    assert effective_length(rows([(1000, 1.0), (1000, 0.6)])) is None


def test_task_records_count_recall_and_distraction_from_the_answer(tiny, tmp_path):
    model, tok = tiny
    # a task whose distractor value the tiny model can echo: the haystack-free answer is scored as given
    cfg = NiahConfig(needle="multi-key", lengths="600,800", depths="0,100", modes="raw,chat+prefix+ind",
                     max_new_tokens=6, out=str(tmp_path), progress=False, effective_threshold=0.5)
    run = run_niah(cfg, model=model, tokenizer=tok, model_name="tiny", plot=False)
    recs = read_records(tmp_path)
    assert len(recs) == 8 and recs == run.records
    task = TASKS["multi-key"]
    values = [v for d in task.distractors for v in d.values]
    for r in recs:  # an independent count of each cell's answer
        words = set(r["answer"].lower().replace(".", " ").replace(",", " ").split())
        assert r["found"] == [k for k in task.keywords if k in words]
        assert r["recall"] == len(r["found"]) / len(task.keywords)
        assert r["distractor_values"] == [v for v in values if v in words]
        assert r["distracted"] == bool(r["distractor_values"])
        assert len(r["positions"]) == 4 and r["positions"][0] == r["needle_token"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["effective_threshold"] == 0.5
    for mode, s in summary["modes"].items():
        rows = [r for r in recs if r["mode"] == mode]
        assert s["distracted_cells"] == sum(r["distracted"] for r in rows)
        assert s["effective_length"] == effective_length(rows, 0.5)
        assert s["recall_by_length"] == {str(L): sum(r["recall"] for r in rows if r["length"] == L) / 2
                                         for L in (600, 800)}


def test_scoring_sees_a_distracted_answer():
    from ctxaware.niah.runner import Cell, _record

    class P:  # the pieces of a cell _record reads
        text, prompt_len = "prompt", 10

    task = TASKS["multi-key"]
    cell = Cell("raw", 600, 0, key="k")
    cell.prompt = type("Prompt", (), {"rendered": P, "prefix": "", "steer": False})()
    cell.placement = type("Pl", (), {"needle_token_index": 3, "haystack_tokens": 50, "positions": (3, 9, 20, 31)})()
    rec = _record((1.0, "all"), "m", task, "h", cell, "It is 28406, or maybe 73914.")
    assert rec["recall"] == 1.0 and rec["found"] == ["73914"]
    assert rec["distracted"] is True and rec["distractor_values"] == ["28406"]
    rec = _record((1.0, "all"), "m", task, "h", cell, "I do not know.")
    assert rec["recall"] == 0.0 and rec["distracted"] is False
    single = _record((1.0, "all"), "m", NEEDLES["SF"], "h", cell, "eat a sandwich")
    assert not {"found", "positions", "distracted"} & set(single)  # single-needle records are unchanged


def test_calibration_scores_heads_over_every_needle_of_a_task(tiny):
    """calibrate's held-in cells of a task hold all its sentences; head scores count every needle token
    (not the distractors'), equal to a brute-force eager sum; the scored answer is the needles."""
    from test_measure_models import brute_force_attentions
    from test_measure_models import tiny_model as family_model

    from ctxaware.calibrate import CalibrationConfig, needle_positions
    from ctxaware.calibrate.heads import retrieval_scores
    from ctxaware.calibrate.search import held_in_cells

    _, tok = tiny
    model = family_model("llama", vocab=len(tok), layers=2, positions=1024)
    for name in ("multi-key", "multi-query"):
        cfg = CalibrationConfig(lengths="700", depths="10", needle=name, progress=False)
        rows, _, task = held_in_cells(cfg, tok)
        assert task == TASKS[name].phrased(0) and len(rows) == 1
        r = rows[0]["prompt"]
        assert all(t in r.text for t in task.inserts)
        assert rows[0]["messages"][-1]["content"] == " ".join(task.texts)
        pos = needle_positions(r, task.texts)
        covered = "".join(r.text[r.offsets[i][0]:r.offsets[i][1]] for i in pos)
        for t in task.texts:
            assert t.replace(" ", "") in covered.replace(" ", "")
        for d in task.distractors:  # no distractor token is counted
            start = r.text.index(d.text)
            assert not [i for i in pos if r.offsets[i][0] >= start and r.offsets[i][1] <= start + len(d.text)]
        scores = retrieval_scores(model, [(r, task.texts)])
        att = brute_force_attentions(model, r.input_ids)
        ref = torch.stack([a[:, -1, pos].sum(-1).double() for a in att])
        torch.testing.assert_close(scores, ref, atol=1e-5, rtol=0)


def test_example_task_files_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "examples" / "niah").glob("*.yaml"))
    assert len(files) == 4
    tasks = {f.stem: load_needle(str(f)) for f in files}
    assert all(not t.single for t in tasks.values())
    lf = tasks["literal-free"]
    assert not content_words(lf.needle) & content_words(lf.question)
    assert not content_words(lf.needle) & content_words(lf.prefix)
    mk = tasks["multi-key"]
    assert mk.depths(0)[0] > max(mk.depths(0)[1:])  # its offsets put the real needle after the distractors
