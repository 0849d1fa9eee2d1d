"""NIH building blocks: grid, modes, needles, scoring, haystack sources and needle placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxaware.errors import ConfigError, InputError, InputFileNotFoundError
from ctxaware.niah import NEEDLES, Haystack, NiahConfig, context_budget, load_needle, read_haystack, recall
from ctxaware.niah.config import canonical_mode, even_grid
from ctxaware.niah.haystack import CORPUS_DIR, PAUL_GRAHAM_FILES
from ctxaware.niah.scoring import normalize_words, summarize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PG_DIR = SHARED / "data" / "paul_graham_essays"

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a default assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer():
    """A 400-token byte-level BPE tokenizer trained on the built-in corpus, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [p.read_text() for p in sorted(CORPUS_DIR.glob("*.txt"))]
    texts += [n.needle + " " + n.question for n in NEEDLES.values()]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = SMOL_TEMPLATE
    fast.name_or_path = "tiny-niah-tokenizer"
    return fast


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --- grid and modes -------------------------------------------------------------------------------

def test_quick_grid_reaches_7k_and_paper_grid_is_20_by_20():
    quick = NiahConfig()
    assert max(quick.grid_lengths()) >= 6000
    assert quick.grid_depths()[0] == 0 and quick.grid_depths()[-1] == 100
    assert {"chat", "chat+steer"} <= set(quick.modes)
    paper = NiahConfig.from_preset("paper", max_length=8000)
    lengths, depths = paper.grid_lengths(), paper.grid_depths()
    assert len(lengths) == 20 and lengths[0] == 200 and lengths[-1] == 8000
    assert len(depths) == 20 and depths[0] == 0 and depths[-1] == 100
    assert all(b > a for a, b in zip(lengths, lengths[1:]))
    assert paper.alpha == 0.95 and paper.max_new_tokens == 100


def test_even_grid_matches_rounded_linspace():
    assert even_grid(0, 100, 5) == [0, 25, 50, 75, 100]
    assert even_grid(200, 4000, 20)[1] == 400


def test_explicit_lengths_depths_modes_from_strings():
    c = NiahConfig(lengths="3000, 1000,1000", depths="50,0,12.5", modes="chat+steer+prefix,raw")
    assert c.grid_lengths() == [1000, 3000]
    assert c.grid_depths() == [0, 12.5, 50]
    assert c.modes == ["chat+prefix+steer", "raw"]
    assert NiahConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs", [{"depths": "0,120"}, {"alpha": 0.0}, {"alpha": 1.5}, {"modes": "chat,foo"},
                                    {"modes": "chat+bogus"}, {"modes": "chat,chat"}, {"lengths": "abc"},
                                    {"min_length": 5000, "max_length": 1000}, {"modes": ""}])
def test_bad_config_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        NiahConfig(**kwargs)


def test_unknown_preset_and_mode_order():
    with pytest.raises(ConfigError):
        NiahConfig.from_preset("nope")
    assert canonical_mode("chat+steer+ind+prefix") == "chat+prefix+ind+steer"


def test_study_dict_ignores_runtime_options():
    a, b = NiahConfig(out="x", progress=False, batch_size=4), NiahConfig(out="y")
    assert a.study_dict() == b.study_dict()
    assert NiahConfig(alpha=0.5).study_dict() != b.study_dict()


# --- scoring ---------------------------------------------------------------------------------------

def test_recall_whole_words_after_punctuation():
    kw = NEEDLES["SF"].keywords
    assert recall("Eat a sandwich, then SIT in Dolores-Park; sunny day!", kw) == 1.0
    assert recall("eating sandwiches while sitting in parks", kw) == 0.0
    assert recall("dolores_park", ["dolores", "park"]) == 1.0
    assert recall("", kw) == 0.0
    assert normalize_words("Espresso-soaked dates.") == ["espresso", "soaked", "dates"]
    pizza = NEEDLES["pizza"]
    assert recall(pizza.needle, pizza.keywords) == 1.0


def test_summary_is_one_minus_mean_recall_per_mode():
    recs = [{"mode": "chat", "recall": 1.0, "tokens": 10}, {"mode": "chat", "recall": 0.5, "tokens": 20},
            {"mode": "raw", "recall": 0.0, "tokens": 10}]
    s = summarize(recs, ["chat", "raw"])
    assert s["chat"]["avg_recall_error"] == pytest.approx(0.25)
    assert s["raw"]["avg_recall_error"] == 1.0 and s["chat"]["perfect_cells"] == 1


# --- needles ---------------------------------------------------------------------------------------

def test_builtin_needles():
    assert len(NEEDLES["pizza"].keywords) == 19
    assert NEEDLES["SF-indicator"].question.endswith(" [IND]")
    assert NEEDLES["SF-indicator"].needle == NEEDLES["SF"].needle
    short = NEEDLES["pizza-short"]
    assert set(short.keywords) < set(NEEDLES["pizza"].keywords) and len(short.needle) < len(NEEDLES["pizza"].needle)
    assert NEEDLES["SF"].prefix == "The best thing to do in San Francisco"
    assert NEEDLES["SF"].with_indicator().question == NEEDLES["SF-indicator"].question


def test_custom_needle_files(tmp_path):
    good = tmp_path / "owl.yaml"
    good.write_text("needle: The owl keeps its spare key under the blue stone.\n"
                    "question: Where does the owl keep its spare key?\nkeywords: [blue, Stone, key]\n")
    n = load_needle(str(good))
    assert n.name == "owl" and n.keywords == ("blue", "Stone", "key")
    js = tmp_path / "n.json"
    js.write_text(json.dumps({"needle": "Seven gulls nest on the pier.", "question": "How many gulls?",
                              "keywords": "seven, gulls"}))
    assert load_needle(str(js)).keywords == ("seven", "gulls")
    cases = [{"needle": "A cat.", "question": "What?", "keywords": ["dog"]},
             {"needle": "A cat sat.", "question": "What?", "keywords": ["cat sat"]},
             {"needle": "A cat.", "question": "What?"},
             {"needle": "A cats.", "question": "What?", "keywords": ["cat"]},
             {"needle": "A cat.", "question": "", "keywords": ["cat"]},
             {"needle": "A cat.", "question": "Q?", "keywords": ["cat"], "extra": 1}]
    for i, case in enumerate(cases):
        p = tmp_path / f"bad{i}.json"
        p.write_text(json.dumps(case))
        with pytest.raises(ConfigError):
            load_needle(str(p))
    with pytest.raises(InputFileNotFoundError):
        load_needle(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="did you mean"):
        load_needle("pizza-shrt")


# --- haystack sources ------------------------------------------------------------------------------

def test_builtin_corpus_is_large_varied_and_free_of_needle_words():
    files = sorted(CORPUS_DIR.glob("*.txt"))
    assert len(files) >= 6
    words = [w for f in files for w in normalize_words(f.read_text())]
    assert len(words) >= 12000
    forbidden = {k for n in NEEDLES.values() for k in n.keywords} | {"francisco", "pizza", "sandwiches"}
    assert not forbidden & set(words)
    hay = read_haystack("builtin")
    assert "\n" not in hay.text and hay.id.startswith("builtin:")


def test_haystack_from_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\nWith lines.\n")
    (tmp_path / "a.txt").write_text("First file.")
    (tmp_path / "skip.md").write_text("not text")
    hay = read_haystack(str(tmp_path))
    assert hay.text == "First file. Second file. With lines. "
    assert read_haystack(str(tmp_path / "b.txt")).text == "Second file. With lines. "
    with pytest.raises(InputFileNotFoundError):
        read_haystack(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        read_haystack(str(tmp_path / "empty"))


@pytest.mark.skipif(not PG_DIR.is_dir(), reason="shared Paul Graham essays not available")
def test_paul_graham_download_once_into_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXAWARE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CTXAWARE_PAUL_GRAHAM_URL", PG_DIR.as_uri() + "/")
    hay = read_haystack("paul_graham")
    cached = tmp_path / "cache" / "haystacks" / "paul_graham"
    assert sorted(p.stem for p in cached.glob("*.txt")) == sorted(PAUL_GRAHAM_FILES)
    assert len(hay.text.split()) > 100_000 and hay.id.startswith("paul_graham:")
    monkeypatch.setenv("CTXAWARE_PAUL_GRAHAM_URL", "file:///nonexistent/dir/")  # cached: no download again
    assert read_haystack("paul_graham").id == hay.id


def test_paul_graham_offline_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXAWARE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CTXAWARE_PAUL_GRAHAM_URL", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(InputError, match="offline") as exc:
        read_haystack("paul_graham")
    assert "\n" not in str(exc.value)
    assert not list((tmp_path / "cache" / "haystacks").glob("paul_graham*/*"))


# --- placement and budget --------------------------------------------------------------------------

def test_budget_small_lengths_do_not_collapse():
    paper = NiahConfig.from_preset("paper").grid_lengths()
    budgets = [context_budget(L, 200) for L in paper]
    assert all(b > a for a, b in zip(budgets, budgets[1:]))
    assert budgets[0] == 100 and context_budget(4000, 200) == 3800


@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_needle_placed_after_a_period_within_budget(tok, depth):
    hay = Haystack("builtin", tok)
    needle = NEEDLES["SF"].needle
    for length in (300, 1000):
        p = hay.place(needle, length, depth)
        assert p.text.count(needle) == 1
        before, after = p.text.split(needle)
        if depth == 100:
            assert after == ""
        elif before:
            assert before.rstrip().endswith(".")
        else:
            assert depth < 50  # only shallow needles may land at the very start
        budget = context_budget(length, 200)
        assert abs(len(tok.encode(p.text, add_special_tokens=False)) - budget) <= 3
        assert p.haystack_tokens + p.needle_tokens == budget
        # the needle sits no deeper than asked (moved back to a sentence end, never forward)
        assert p.needle_token_index <= int(p.haystack_tokens * depth / 100) or depth == 100


def test_depths_are_monotonic_and_haystack_repeats_for_long_lengths(tok):
    hay = Haystack("builtin", tok)
    needle = NEEDLES["SF"].needle
    positions = [hay.place(needle, 2000, d).needle_token_index for d in (0, 25, 50, 75, 100)]
    assert positions == sorted(positions) and positions[0] == 0 and positions[-1] > positions[-2]
    n = len(hay.token_ids())
    long = hay.place(needle, n + 5000, 50)
    assert long.haystack_tokens > n
    with pytest.raises(ConfigError, match="too small"):
        hay.place(needle, 20, 50)


def test_haystack_tokenised_once_per_tokenizer(tok, monkeypatch):
    calls = []
    orig = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: calls.append(len(text)) or orig(text, **kw))
    text = read_haystack("builtin")
    for _ in range(3):
        h = Haystack(text, tok)
        h.place(NEEDLES["SF"].needle, 500, 50)
    big = [c for c in calls if c > 10000]
    assert len(big) <= 1
