"""Question phrasings: every built-in needle and task has at least three, distinct, asking for the same answer;
phrasing 0 is the needle as it always was; files accept a ``questions`` list."""

from __future__ import annotations

import json

import pytest
from test_niah_tasks import content_words

from ctxaware.errors import ConfigError
from ctxaware.niah.needles import builtin_needles, load_needle
from ctxaware.niah.scoring import normalize_words


@pytest.mark.parametrize("name", sorted(builtin_needles()))
def test_builtin_phrasings_distinct_and_preserve_the_answer(name):
    full = load_needle(name, None)
    ph = full.phrasings
    assert len(ph) >= 3 and len({" ".join(normalize_words(q)) for q in ph}) == len(ph)
    needle_words = set().union(*(content_words(t) for t in full.texts))
    subject = content_words(ph[0]) & needle_words  # what phrasing 0 asks about (San Francisco, the ruby lantern, ...)
    for i, q in enumerate(ph):
        n = full.phrased(i)
        assert n.keywords == full.keywords and n.texts == full.texts and n.answer_prefix == full.answer_prefix
        if subject:  # the same thing is asked about: a word of the needle's subject in every phrasing
            assert content_words(q) & subject, (q, subject)
        else:  # literal-free: the place (or food) asked about is kept
            assert normalize_words(ph[0])[-1] in normalize_words(q), q
        assert not {k.lower() for k in full.keywords} & set(normalize_words(q))  # the answer is not given away
        if name.startswith("literal-free"):
            assert not content_words(q) & needle_words, q  # still literal-free
        assert q.endswith("[IND]") == name.endswith("-indicator")
    assert load_needle(name).to_dict() == {k: v for k, v in full.to_dict().items() if k != "questions"}


def test_file_questions_list(tmp_path):
    base = {"needle": "The special magic number for the ruby lantern is 73914.", "keywords": [73914]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps({**base, "questions": ["What is the ruby lantern's special magic number?",
                                                    "Which special magic number has the ruby lantern?"]}))
    n = load_needle(str(p), None)
    assert n.question.startswith("What") and len(n.phrasings) == 2
    assert load_needle(str(p) + "@q1").question.startswith("Which") and load_needle(str(p) + "@q1").name == "t@q1"
    one = tmp_path / "one.json"
    one.write_text(json.dumps({**base, "question": "What is the ruby lantern's special magic number?"}))
    assert set(load_needle(str(one)).to_dict()) == {"name", "needle", "question", "keywords"}  # unchanged format
    p.write_text(json.dumps({**base, "questions": ["What is it?", "what is it"]}))
    with pytest.raises(ConfigError, match="distinct"):
        load_needle(str(p))
    with pytest.raises(ConfigError, match="phrasing"):
        load_needle("SF@q7")
