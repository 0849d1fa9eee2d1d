"""Built-in NIH tasks harder than one needle: RULER-style multi-needle retrieval and literal-free needles.

- ``multi-key``: one real key among three distractor keys that differ from it by one word (RULER's
  multi-key NIAH); the answer must give the real key's number, and one that gives a distractor's
  number is counted as ``distracted``.
- ``multi-value``: three numbers of one key, spread from the cell's depth to the end; all three
  must be recalled (RULER's multi-value).
- ``multi-query``: two keys asked at once, each with its own number (RULER's multi-query).
- ``literal-free``, ``literal-free-2`` ... ``literal-free-6``: written for ctxaware in the manner
  of NoLiMa: question and needle share no content word, so the needle cannot be found by matching
  words; the answer is the name of the character in the needle, and finding it takes one step of
  world knowledge (the Kiasma museum is in Helsinki). :data:`LITERAL_FREE` lists the pairs (also in
  docs/niah.md); their ``+prefix`` answer opening restates the question, never the needle.

Numbers and names occur in no built-in haystack (checked by the tests).
"""

from __future__ import annotations

from .needles import Distractor, Needle

_MAGIC = "The special magic number for the {key} is {value}."


def _multi_key() -> Needle:
    real = "ruby lantern"
    distract = (("ruby ladder", "28406"), ("copper lantern", "51837"), ("ruby lanterns", "64290"))
    return Needle("multi-key", _MAGIC.format(key=real, value="73914"),
                  f"What is the special magic number for the {real}?", ("73914",),
                  questions=(f"Which number is the special magic number of the {real}?",
                             f"Give the special magic number for the {real}."),
                  distractors=tuple(Distractor(_MAGIC.format(key=k, value=v), (v,)) for k, v in distract),
                  answer_prefix=f"The special magic number for the {real} is")


def _multi_value() -> Needle:
    values = ("73914", "28406", "51837")
    texts = [f"One of the special magic numbers for the amber kettle is {v}." for v in values]
    return Needle("multi-value", texts[0], "What are all the special magic numbers for the amber kettle?", values,
                  questions=("List every special magic number given for the amber kettle.",
                             "Which special magic numbers does the amber kettle have? Give all of them."),
                  extra_needles=tuple(texts[1:]),
                  answer_prefix="The special magic numbers for the amber kettle are")


def _multi_query() -> Needle:
    pairs = (("ruby lantern", "73914"), ("silver compass", "28406"))
    texts = [_MAGIC.format(key=k, value=v) for k, v in pairs]
    return Needle("multi-query", texts[0],
                  "What are the special magic numbers for the ruby lantern and for the silver compass?",
                  tuple(v for _, v in pairs), extra_needles=tuple(texts[1:]),
                  questions=("Give the special magic number of the ruby lantern and that of the silver compass.",
                             "Which special magic numbers belong to the ruby lantern and to the silver compass?"),
                  answer_prefix="The special magic numbers for the ruby lantern and the silver compass are")


#: (needle, question, keyword, +prefix opening): question and needle share no content word
LITERAL_FREE: tuple[tuple[str, str, str, str], ...] = (
    ("Actually, Mirela lives right beside the Kiasma museum.",
     "Which character has been to Helsinki?", "Mirela", "The character who has been to Helsinki is"),
    ("Tobias spent last summer painting the walls of the Alhambra.",
     "Which character has visited Granada?", "Tobias", "The character who has visited Granada is"),
    ("Every morning, Ingrid jogs past the Brandenburg Gate before work.",
     "Which character lives in Berlin?", "Ingrid", "The character who lives in Berlin is"),
    ("Kofi cannot eat anything made with wheat flour.",
     "Which character must avoid bread?", "Kofi", "The character who must avoid bread is"),
    ("Last week, Priya finally saw the Mona Lisa in person.",
     "Which character has been to Paris?", "Priya", "The character who has been to Paris is"),
    ("Dmitri keeps a photo of himself standing under the Golden Gate.",
     "Which character has visited California?", "Dmitri", "The character who has visited California is"),
)


#: two more phrasings of each literal-free question (again sharing no content word with the needle)
LITERAL_FREE_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("Who among the characters has visited Helsinki?", "Name the character who has travelled to Helsinki."),
    ("Who among the characters has been to Granada?", "Name the character who has travelled to Granada."),
    ("Who among the characters resides in Berlin?", "Name the character whose home is in Berlin."),
    ("Who among the characters has to stay away from bread?", "Name the character for whom bread is off limits."),
    ("Who among the characters has visited Paris?", "Name the character who has travelled to Paris."),
    ("Who among the characters has been to California?", "Name the character who has travelled to California."),
)


def _literal_free() -> dict[str, Needle]:
    out = {}
    for i, (needle, question, keyword, prefix) in enumerate(LITERAL_FREE):
        name = "literal-free" if i == 0 else f"literal-free-{i + 1}"
        out[name] = Needle(name, needle, question, (keyword,), answer_prefix=prefix,
                           questions=LITERAL_FREE_QUESTIONS[i])
    return out


TASKS: dict[str, Needle] = {"multi-key": _multi_key(), "multi-value": _multi_value(), "multi-query": _multi_query(),
                            **_literal_free()}
