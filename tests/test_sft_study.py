"""sft-study on a tiny random model: both arms from one base with equal settings, [IND] only in the
conditional arm, the report's numbers against an independent count of the result files, refusal of
a dataset with no labelled turn before training, and a kill during training resumed.

One module-scoped run (tiny Llama, 12 conversations, 4 LoRA steps per arm, a 2 × 2 NIH grid, SQuAD
on 3 questions, MT-Bench on a fake judge) is interrupted after the conditional arm's first checkpoint
and resumed; the tests then check its files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("lm_eval")

from test_harness import write_data as write_qa_data  # noqa: E402
from test_niah_runner import tiny_model  # noqa: E402
from test_niah_unit import tiny_tokenizer  # noqa: E402

from ctxaware.errors import ConfigError, InputError  # noqa: E402
from ctxaware.sftstudy import SftStudyConfig, run_sft_study  # noqa: E402
from ctxaware.sftstudy.runner import ARM_FIELDS, compare_settings  # noqa: E402
from ctxaware.training.conditions import INDICATOR, indicator_token_id  # noqa: E402

torch.set_num_threads(1)

PASSAGES = ["The fox jumps over the lazy dog.", "Cats sleep a lot in the sun.", "Paris is the capital of France.",
            "The best thing in San Francisco is a sandwich.", "Rain falls in April.", "The dog sleeps at night."]
RECIPE = dict(method="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="q_proj,v_proj",
              max_length=160, drop_unsupervised=True, learning_rate=1e-2, per_device_train_batch_size=2,
              max_steps=4, lr_scheduler_type="constant", warmup_ratio=0.0, dtype="float32", cpu=True,
              logging_steps=1, save_steps=2, save_total_limit=2, sft={"optim": "adamw_torch"})


def write_dataset(path: Path) -> Path:
    rows = []
    for i, p in enumerate(PASSAGES * 2):
        q = "What does it say?" if i % 2 else "Hello, how are you?"
        rows.append({"id": i, "messages": [{"role": "user", "content": f"{p} {q}" if i % 2 else q},
                                          {"role": "assistant", "content": p if i % 2 else "I am fine."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft") / "base"
    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _cfg(base: Path, root: Path, **kw) -> SftStudyConfig:
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    values = dict(dataset=str(write_dataset(root / "data.jsonl")), out=str(root / "study"), model=str(base),
                  probe=str(base), recipe=str(recipe), target_fraction=0.5, modes="chat+prefix", lengths="200,320",
                  depths="0,100", max_new_tokens=3, attention_length=300, attention_depths="0,100",
                  score_max_length=256, progress=False)
    values.update(kw)
    return SftStudyConfig(**values)


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def study(base, tmp_path_factory):
    """The study, killed after the conditional arm's first checkpoint and resumed."""
    from mtbench_judge import FakeJudge, write_data as write_mt_data
    from transformers import Trainer

    root = tmp_path_factory.mktemp("run")
    qa = root / "qa"
    write_qa_data(qa)
    mt = write_mt_data(root / "mt")
    with FakeJudge() as judge:
        cfg = _cfg(base, root, qa="squad", qa_limit=3, data_dir=str(qa), mtbench_judge_url=judge.base_url,
                   mtbench_judge_model="fake-judge", mtbench_limit=2, mtbench_max_new_tokens=4,
                   mtbench_data_dir=str(mt))
        original = Trainer._save_checkpoint

        def save_then_die(self, model, trial):
            original(self, model, trial)
            if "conditional" in str(self.args.output_dir):
                raise Killed("killed after a checkpoint")

        mp = pytest.MonkeyPatch()
        mp.setattr(Trainer, "_save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_sft_study(cfg)
        mp.undo()
        out = Path(cfg.out)
        killed_state = json.loads((out / "sft_study.json").read_text())
        run = run_sft_study(cfg)
    return {"cfg": cfg, "out": out, "run": run, "killed_state": killed_state}


@pytest.mark.slow  # the shared run takes about 40 s on 2 cores
def test_kill_during_training_resumes_from_the_checkpoint(study):
    killed = study["killed_state"]["stages"]["train"]
    assert killed["vanilla"]["done"] and not killed["conditional"]["done"]
    cond = study["run"].state["stages"]["train"]["conditional"]
    assert cond["resumed_from"] and cond["resumed_from"].endswith("checkpoint-2") and cond["steps"] == 4
    assert study["run"].state["stages"]["train"]["vanilla"]["resumed_from"] is None  # not trained again


@pytest.mark.slow  # the shared run takes about 40 s on 2 cores
def test_both_arms_from_one_base_with_equal_settings(study, base):
    import yaml

    out = study["out"]
    saved = {arm: yaml.safe_load((out / arm / "model" / "ctxaware_train.yaml").read_text())
             for arm in ("vanilla", "conditional")}
    differ = {k for k in saved["vanilla"] if saved["vanilla"][k] != saved["conditional"][k]}
    assert differ <= set(ARM_FIELDS) and {"indicator", "add_indicator_token"} <= differ
    assert saved["vanilla"]["model"] == saved["conditional"]["model"] == str(base)
    assert saved["vanilla"]["dataset"] == saved["conditional"]["dataset"]
    settings = study["run"].state["settings"]
    assert set(settings["differ"]) <= set(ARM_FIELDS) and settings["equal"]["seed"] == saved["vanilla"]["seed"]
    data = settings["data"]
    assert data["examples"]["vanilla"] == data["examples"]["conditional"]
    assert data["supervised_tokens"]["vanilla"] == data["supervised_tokens"]["conditional"]  # same answers
    assert data["steps"] == {"vanilla": 4, "conditional": 4} and settings["data_equal"] is True
    with pytest.raises(ConfigError, match="learning_rate"):
        compare_settings({"vanilla": {"learning_rate": 1.0}, "conditional": {"learning_rate": 2.0}})


@pytest.mark.slow  # the shared run takes about 40 s on 2 cores
def test_ind_row_added_and_trained_only_in_the_conditional_arm(study, base):
    from safetensors.torch import load_file

    from ctxaware.models import load_model, load_tokenizer

    out = study["out"]
    base_tok = load_tokenizer(str(base))
    tok = {arm: load_tokenizer(str(out / arm / "model")) for arm in ("vanilla", "conditional")}
    assert indicator_token_id(base_tok) is None and indicator_token_id(tok["vanilla"]) is None
    tid = indicator_token_id(tok["conditional"])
    assert tid == len(base_tok) and len(tok["vanilla"]) == len(base_tok)
    keys = {arm: load_file(str(out / arm / "model" / "adapter_model.safetensors")) for arm in tok}
    assert not any("trainable_tokens" in k for k in keys["vanilla"])
    rows = [v for k, v in keys["conditional"].items() if "trainable_tokens_delta" in k]
    assert rows and all(r.shape[0] == 1 for r in rows)
    b = load_model(str(base), dtype="float32", device="cpu").model.get_input_embeddings().weight
    emb = {arm: load_model(str(out / arm / "model"), dtype="float32", device="cpu").model.get_input_embeddings().weight
           for arm in tok}
    assert emb["vanilla"].shape == b.shape and torch.equal(emb["vanilla"], b)
    assert torch.equal(emb["conditional"][: len(b)], b)  # only the [IND] row moved
    assert not torch.allclose(emb["conditional"][tid], b.mean(0), atol=1e-6)  # trained away from the mean init


def _cells(html: str) -> dict[tuple[str, str], float]:
    found = re.findall(r'data-row="([^"]+)" data-col="([^"]+)" data-value="([^"]+)" data-se="([^"]+)"', html)
    return {(r.replace("&amp;", "&"), c): (float(v), None if se == "None" else float(se)) for r, c, v, se in found}


def _mean_se(xs):
    import statistics

    return sum(xs) / len(xs), statistics.stdev(xs) / len(xs) ** 0.5


@pytest.mark.slow  # the shared run takes about 40 s on 2 cores
def test_report_numbers_equal_an_independent_count(study):
    out = study["out"]
    html = (out / "report.html").read_text()
    cells = _cells(html)

    def niah(arm, mode):
        recs = [json.loads(line) for line in (out / arm / "niah" / "results.jsonl").read_text().splitlines()
                if line.strip()]
        return _mean_se([r["recall"] for r in recs if r["mode"] == mode])

    def squad(arm, variant):
        data = json.loads((out / arm / "qa" / variant.replace("+", "_") / "results.json").read_text())
        (task, row), = [(t, r) for t, r in data["results"].items() if "squad" in t]
        key = next(k for k in row if k.startswith("contains,"))
        return row[key], row[key.replace("contains", "contains_stderr")]

    def mtbench(arm):
        js = [json.loads(line) for line in (out / arm / "mtbench" / "judgments.jsonl").read_text().splitlines()]
        return _mean_se([j["score"] for j in js if j["model"] == arm and j["score"] is not None])

    expect = {("vanilla", "NIH chat+prefix"): niah("vanilla", "chat+prefix"),
              ("conditional + [IND]", "NIH chat+prefix"): niah("conditional", "chat+prefix+ind"),
              ("conditional, no [IND] (ablation)", "NIH chat+prefix"): niah("conditional", "chat+prefix"),
              ("vanilla", "SQuAD"): squad("vanilla", "chat"),
              ("conditional + [IND]", "SQuAD"): squad("conditional", "chat+ind"),
              ("conditional, no [IND] (ablation)", "SQuAD"): squad("conditional", "chat"),
              ("vanilla", "MT-Bench"): mtbench("vanilla"), ("conditional + [IND]", "MT-Bench"): mtbench("conditional")}
    assert set(cells) == set(expect)
    for key, (value, se) in expect.items():
        assert cells[key][0] == pytest.approx(value, abs=1e-12), key
        assert cells[key][1] == pytest.approx(se, abs=1e-12), key
    # one verdict per comparison and column, stating the numbers of the table
    verdicts = re.findall(r'<li data-kind="sft">([^<]+)</li>', html)
    assert len(verdicts) == 3 + 2
    v, c = expect[("vanilla", "NIH chat+prefix")], expect[("conditional + [IND]", "NIH chat+prefix")]
    assert any(t.startswith("NIH chat+prefix: conditional + [IND]") and f"{c[0]:.3f}" in t and f"{v[0]:.3f}" in t
               and f"{c[0] - v[0]:+.3f}" in t for t in verdicts)
    assert "chat+prefix+ind" in {r["mode"] for r in map(json.loads, (out / "conditional" / "niah" / "results.jsonl")
                                                        .read_text().splitlines())}


@pytest.mark.slow  # the shared run takes about 40 s on 2 cores
def test_labelling_recorded(study):
    lab = study["run"].state["stages"]["label"]
    assert lab["scored_turns"] == 12 and lab["labelled_turns"] == 6 and lab["fraction_labelled"] == 0.5
    rows = [json.loads(line) for line in (study["out"] / "data" / "labelled.jsonl").read_text().splitlines()]
    assert sum(m["content"].endswith(INDICATOR) for r in rows for m in r["messages"] if m["role"] == "user") == 6


@pytest.mark.slow  # the shared run takes about 40 s on 2 cores
def test_both_arms_monitored_through_the_kill_and_drawn_side_by_side(study):
    from ctxaware.report.monitor import read_monitor

    steps = {}
    for arm in ("vanilla", "conditional"):
        lines = [json.loads(x) for x in (study["out"] / arm / "model" / "context_awareness.jsonl").read_text().splitlines()]
        steps[arm] = [r["step"] for r in lines]  # the killed arm probed 0 and 2, its resumed run only 4
        assert [r["step"] for r in read_monitor(study["out"] / arm / "model" / "context_awareness.jsonl")] == steps[arm]
    assert steps == {"vanilla": [0, 2, 4], "conditional": [0, 2, 4]}
    train = study["run"].state["stages"]["train"]
    assert train["conditional"]["monitor"]["probes"] == 1 and train["vanilla"]["monitor"]["probes"] == 3
    html = (study["out"] / "report.html").read_text()
    section = html.split("Context awareness during training")[1]
    assert section.count("<tr><td>vanilla</td>") == 3 and section.count("<tr><td>conditional</td>") == 3


@pytest.mark.slow  # the shared run takes about 40 s on 2 cores
def test_rerun_with_other_training_options_is_refused(study):
    with pytest.raises(ConfigError, match="max_steps"):
        run_sft_study(study["cfg"].replace(max_steps=7))


def test_no_labelled_turn_is_refused_before_training(base, tmp_path):
    cfg = _cfg(base, tmp_path, target_fraction=None, threshold=1.0)
    with pytest.raises(InputError, match=r"no user turn is labelled at --threshold 1 \(best score seen 0\.\d+"):
        run_sft_study(cfg)
    out = Path(cfg.out)
    assert (out / "data" / "scored.jsonl").is_file() and not (out / "vanilla").exists()
    # a fraction too small for the data is refused before the probe runs
    cfg = _cfg(base, tmp_path / "small", target_fraction=0.01)
    with pytest.raises(InputError, match="labels no turn of 12 answers"):
        run_sft_study(cfg)
    assert not (Path(cfg.out) / "data" / "scored.jsonl").exists()


def test_cli_refuses_in_one_line_and_lists_its_options(base, tmp_path, capsys):
    from ctxaware.cli.main import main

    cfg = _cfg(base, tmp_path, target_fraction=None, threshold=1.0)
    args = ["sft-study", "--dataset", cfg.dataset, "--out", cfg.out, "--model", str(base), "--probe", str(base),
            "--recipe", cfg.recipe, "--threshold", "1.0", "--score-max-length", "256", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no user turn is labelled at --threshold 1" in err[0] and "best score seen" in err[0]
    assert main(["sft-study", "--dataset", cfg.dataset, "--threshold", "0.5", "--target-fraction", "0.1"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sft-study", "--help"])
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--probe", "--target-fraction", "--lora", "--max-steps", "--recipe", "--qa",
                                      "--mtbench-judge-url", "--template-file"))


def test_prescored_dataset_is_checked_before_anything_and_not_rescored(tmp_path):
    rows = [json.loads(line) for line in write_dataset(tmp_path / "plain.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["ctx_scores"] = [0.1 + 0.01 * i]
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SftStudyConfig(dataset=str(scored), out=str(tmp_path / "study"), probe="no/such-probe",
                         model="no/such-model", target_fraction=None, threshold=0.5, progress=False)
    with pytest.raises(InputError, match=r"--threshold 0\.5 \(best score seen 0\.2100 over 12 scored turns\)"):
        run_sft_study(cfg)  # neither model is loaded: the names do not exist
    assert not (Path(cfg.out) / "data" / "scored.jsonl").exists()


def test_verdict_wording_follows_the_numbers():
    from ctxaware.sftstudy.report import compare

    def cell(v, se, n=6):
        return {"value": v, "se": se, "n": n}

    assert "c is better (beyond two standard errors, 0.224)" in compare("NIH", "c", cell(0.9, 0.05), "v",
                                                                          cell(0.5, 0.1)).text
    assert "c is worse" in compare("NIH", "c", cell(0.5, 0.0), "v", cell(1.0, 0.0)).text
    assert "no clear difference (within two standard errors, 0.283)" in compare("QA", "c", cell(0.6, 0.1), "v",
                                                                               cell(0.5, 0.1)).text
    assert "no difference" in compare("NIH", "c", cell(1.0, 0.0), "v", cell(1.0, 0.0)).text
    assert "no verdict" in compare("QuAC", "c", cell(1.0, None, 1), "v", cell(0.0, None, 1)).text
    assert compare("QuAC", "c", cell(None, None, 0), "v", cell(0.0, None, 1)) is None
