"""The context-awareness training monitor: unchanged training, logged and stored probes, resume, stopping rule.

Tiny random Llama models and the byte-level tokenizer of ``test_training``; a few optimiser steps each.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from test_training import CHATS, _fast, make_model, make_tokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from ctxaware.errors import ConfigError  # noqa: E402
from ctxaware.training.callback import ContextAwarenessCallback, _checkpointing, preserved_training_state  # noqa: E402
from ctxaware.training.probe import MONITOR_FILE, ContextProbe, MonitorConfig  # noqa: E402
from ctxaware.training.trainer import build_trainer  # noqa: E402

PROBE = dict(lengths="160", depths="0,100", reserve=60, max_new_tokens=6, attention_length=160,
             attention_depths="50")
CONVS = CHATS * 4


def _setup(tmp_path, name="out", **kw):
    tok = make_tokenizer("chatml")
    cfg = _fast(tmp_path, output_dir=str(tmp_path / name), **{"max_steps": 4, "lora_dropout": 0.1, **kw})
    return build_trainer(cfg, model=make_model(len(tok), seed=5), tokenizer=tok, conversations=CONVS)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


class _Seen(TrainerCallback):
    """Stands for a report_to integration: records what on_log hands the trackers."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_is_unchanged_and_probes_are_logged_and_stored(tmp_path, method):
    plain = _setup(tmp_path, "plain", method=method)
    plain.trainer.train()
    watched = _setup(tmp_path, "watched", method=method)
    seen = _Seen()
    watched.trainer.add_callback(seen)
    cb = ContextAwarenessCallback(every=2, **PROBE).attach(watched.trainer)
    watched.trainer.train()
    assert len(_losses(plain.trainer)) == 4
    assert _losses(watched.trainer) == _losses(plain.trainer)  # bit for bit: RNG, modes, cache all restored
    for a, b in zip(plain.trainer.model.parameters(), watched.trainer.model.parameters()):
        assert torch.equal(a, b)
    records = [json.loads(x) for x in (tmp_path / "watched" / MONITOR_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    for r in records:
        m = r["metrics"]
        assert {"context/recall/raw+prefix", "context/recall/chat+prefix", "context/template_gap",
                "context/user_share/template", "context/user_share/no_template"} <= set(m)
        assert m["context/template_gap"] == pytest.approx(m["context/recall/raw+prefix"] - m["context/recall/chat+prefix"])
        assert 0 < m["context/user_share/template"] < 1 and 0 < m["context/user_share/no_template"] < 1
        assert len(r["cells"]) == 4 and r["identity"] in r["key"]
    shares = [r["metrics"]["context/user_share/template"] for r in records]
    assert shares[0] != shares[-1]  # the probe sees the model being trained, not a frozen copy
    logged = [x for x in seen.logs if "context/template_gap" in x]  # what the trackers got
    assert len(logged) == 3 and logged[-1]["context/user_share/template"] == records[-1]["metrics"][
        "context/user_share/template"]
    assert cb.seconds > 0 and watched.trainer.model.training


def test_logged_values_are_recomputed_from_the_saved_checkpoint(tmp_path):
    from ctxaware import models

    setup = _setup(tmp_path, method="full", save_steps=2, save_total_limit=None)
    ContextAwarenessCallback(every=2, at_start=False, **PROBE).attach(setup.trainer)
    setup.trainer.train()
    rec = {r["step"]: r for r in map(json.loads, (tmp_path / "out" / MONITOR_FILE).read_text().splitlines())}
    assert sorted(rec) == [2, 4]
    model, tok = models.load_model(str(tmp_path / "out" / "checkpoint-2"), dtype="float32")
    again = ContextProbe(MonitorConfig(**PROBE), tok).run(model.eval())
    for k, v in rec[2]["metrics"].items():
        assert again["metrics"][k] == pytest.approx(v, abs=1e-5), k
    assert [c["answer"] for c in again["cells"]] == [c["answer"] for c in rec[2]["cells"]]


def test_resumed_run_neither_probes_nor_appends_a_step_twice(tmp_path):
    setup = _setup(tmp_path, method="full", save_steps=2, save_total_limit=None)
    ContextAwarenessCallback(every=2, **PROBE).attach(setup.trainer)
    setup.trainer.train()
    path = tmp_path / "out" / MONITOR_FILE
    first = path.read_text()
    again = _setup(tmp_path, method="full", save_steps=2, save_total_limit=None)
    cb = ContextAwarenessCallback(every=2, **PROBE).attach(again.trainer)
    cb.measure = lambda model: pytest.fail("a stored step was probed again")
    again.trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert path.read_text() == first
    # steps 0 and 2 come back with the checkpoint's trainer state, step 4 is re-logged from the file: each once
    assert [h["step"] for h in again.trainer.state.log_history if "context/template_gap" in h] == [0, 2, 4]
    assert [h["step"] for h in cb._trail] == [2, 4]  # the stopping rule also counts the probe before the resume
    other = _setup(tmp_path, method="full", save_steps=2, save_total_limit=None)  # another probe: its own records
    ContextAwarenessCallback(every=4, at_start=False, **{**PROBE, "depths": "50"}).attach(other.trainer)
    other.trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 4 and len({r["key"] for r in lines}) == 4 and lines[-1]["step"] == 4


def test_stopping_rule_stops_after_patience_and_saves(tmp_path):
    setup = _setup(tmp_path, method="full", max_steps=10)
    cb = ContextAwarenessCallback(every=1, stop_gap=-1.5 + 0.5, stop_patience=2, **PROBE).attach(setup.trainer)
    setup.trainer.train()  # the gap is >= -1 always; "> -1" holds unless raw recall 0 and chat 1
    gaps = [h["context/template_gap"] for h in cb.history]
    assert all(g > -1.0 for g in gaps)
    assert cb.stopped_at == 2 and setup.trainer.state.global_step == 2
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()


def test_stopping_rule_counts_consecutive_probes_only():
    class Control:
        should_training_stop = should_save = False

    cb = ContextAwarenessCallback(stop_gap=0.2, stop_patience=2)
    control = Control()
    for step, gap in [(1, 0.3), (2, 0.1), (3, 0.25)]:
        cb._trail.append({"step": step, "context/template_gap": gap})
        cb._maybe_stop(step, {"context/template_gap": gap}, control)
        assert not control.should_training_stop
    cb._maybe_stop(0, {"context/template_gap": 0.9}, control)  # step 0 (before training) never stops
    assert not control.should_training_stop
    cb._trail.append({"step": 4, "context/template_gap": 0.21})
    cb._maybe_stop(4, {"context/template_gap": 0.21}, control)
    assert control.should_training_stop and control.should_save and cb.stopped_at == 4


def test_preserved_state_restores_modes_cache_rng_and_grad():
    import random

    import numpy as np

    model = make_model(64, seed=1)
    model.train()
    model.model.layers[0].eval()  # a module left in eval mode stays so
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    r, n, t = random.random, np.random.rand, torch.rand
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    with preserved_training_state(model):
        assert not model.training and not torch.is_grad_enabled()
        model.config.use_cache = True
        r(), n(), t(3)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert model.config.use_cache is False and torch.is_grad_enabled()
    assert _checkpointing(model)
    assert (random.getstate(), torch.equal(torch.get_rng_state(), state[2])) == (state[0], True)
    assert np.array_equal(np.random.get_state()[1], state[1][1])


def test_monitor_config_validation():
    with pytest.raises(ConfigError, match="two or more"):
        MonitorConfig(modes="chat+prefix")
    with pytest.raises(ConfigError, match="cannot steer"):
        MonitorConfig(modes="raw,chat+steer")
    with pytest.raises(ConfigError, match="every"):
        MonitorConfig(every=0)
    with pytest.raises(ConfigError, match="stop_gap"):
        MonitorConfig(stop_gap=2)
    with pytest.raises(ConfigError, match="either"):
        ContextAwarenessCallback(config=MonitorConfig(), every=3)
    assert MonitorConfig(modes="chat+prefix+ind,raw+prefix,chat+prefix").gap_modes == ("raw+prefix", "chat+prefix")
    assert MonitorConfig(modes="raw,chat+prefix").gap_modes == ("raw", "chat+prefix")
    assert MonitorConfig(modes="chat,chat+ind").gap_modes is None


def test_cli_train_monitor_then_report_draws_the_curves(tmp_path, capsys):
    from ctxaware.cli.main import main

    tok = make_tokenizer("chatml")
    base = tmp_path / "base"
    make_model(len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 2), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("monitor_options: " + json.dumps({k: v for k, v in PROBE.items()}) + "\n")
    out = tmp_path / "run"
    args = ["train", "--config", str(recipe), "--model", str(base), "--dataset", str(data), "--output-dir", str(out),
            "--method", "full", "--max-steps", "2", "--cpu", "--no-progress", "--max-length", "128",
            "--per-device-train-batch-size", "2", "--sft-arg", "optim=adamw_torch", "--monitor", "--monitor-every", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "monitor: 3 probes" in printed and "template gap" in printed
    assert main(["train", "--monitor-stop-gap", "0.1", "--print-config"]) == 2  # needs --monitor
    assert "needs --monitor" in capsys.readouterr().err
    page = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(page)]) == 0
    html = page.read_text()
    assert "Context awareness during training" in html and "data:image/png;base64," in html
    rows = html.split('class="monitor"')[1]
    assert rows.count("<tr>") == 1 + 3  # header + steps 0, 1, 2


def test_report_reads_the_last_probe_configuration_once_per_step(tmp_path):
    from ctxaware.fsio import append_jsonl
    from ctxaware.report.monitor import read_monitor, section

    path = tmp_path / MONITOR_FILE
    for ident, step, gap in [("a", 0, 0.5), ("b", 0, 0.1), ("b", 2, 0.2), ("b", 2, 0.9), ("b", 1, 0.3)]:
        append_jsonl(path, {"key": f"step={step}|id={ident}", "identity": ident, "step": step,
                            "metrics": {"context/template_gap": gap, "context/recall/raw": 1.0}})
    recs = read_monitor(path)
    assert [(r["step"], r["metrics"]["context/template_gap"]) for r in recs] == [(0, 0.1), (1, 0.3), (2, 0.2)]
    assert "0.300" in section({"run": recs}) and section({"run": []}) == ""


def test_qa_sample_is_answered_and_scored_by_contains(tmp_path):
    from test_harness import ANSWERS, write_data

    from ctxaware.harness.qa import contains

    write_data(tmp_path / "qa")
    tok = make_tokenizer("chatml")
    probe = ContextProbe(MonitorConfig(**PROBE, attention=False, qa="squad", qa_limit=2, qa_max_new_tokens=4,
                                       data_dir=str(tmp_path / "qa")), tok)
    got = probe.run(make_model(len(tok), seed=2).eval())
    assert len(got["qa"]) == 2 and "context/user_share/template" not in got["metrics"]
    assert [q["contains"] for q in got["qa"]] == [contains(q["answer"], a) for q, a in zip(got["qa"], ANSWERS)]
    assert got["metrics"]["context/qa/squad"] == sum(q["contains"] for q in got["qa"]) / 2
    with pytest.raises(ConfigError, match="qa must be"):
        MonitorConfig(qa="nq")
