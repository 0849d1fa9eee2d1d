"""The ``--engine`` options of the generating commands (niah, study, mtbench, sft-study), without vLLM.

Validation before any work, the one-line refusal when vLLM is not installed, the engine's part in a
result's identity, and :class:`ctxaware.vllm.generate.Feeder` (which job joins vLLM's batch when).
The vLLM runs themselves are in ``tests/test_vllm_engine.py`` (vLLM environment).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ctxaware.errors import ConfigError, MissingDependencyError

COMMANDS = {
    "niah": ["niah", "--lengths", "500", "--depths", "0"],
    "study": ["study", "--lengths", "500", "--depths", "0"],
    "mtbench": ["mtbench", "--judge-base-url", "http://127.0.0.1:9/v1"],
    "sft-study": ["sft-study", "--dataset", "missing-is-not-read-yet.jsonl"],
}


@pytest.fixture
def no_loading(monkeypatch):
    """Model loading fails the test: a refused option must stop before any model is touched."""
    import ctxaware.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ctxaware.models, "load_model", boom)
    monkeypatch.setattr(ctxaware.models, "load_tokenizer", boom)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_engine_vllm_without_vllm_is_one_line_and_writes_nothing(command, tmp_path, monkeypatch, capsys, no_loading):
    import ctxaware.engines
    from ctxaware.cli.main import main

    monkeypatch.setattr(ctxaware.engines, "vllm_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    rc = main([*COMMANDS[command], "--engine", "vllm", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--engine vllm needs vLLM" in err and "pip install" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--engine", "tgi"], "invalid choice"),
    (["--tensor-parallel-size", "2"], "apply only to --engine vllm"),
    (["--engine", "vllm", "--tensor-parallel-size", "0"], "tensor_parallel_size must be a whole number >= 1"),
    (["--engine", "vllm", "--vllm-options", "{gpu: 1}"], "vllm_options is not valid JSON"),
    (["--engine", "vllm", "--vllm-options", "[1, 2]"], "must be a JSON object"),
    (["--engine", "vllm", "--vllm-options", '{"dtype": "half"}'], "may not set dtype"),
])
def test_bad_engine_options_refused_before_work(args, message, tmp_path, monkeypatch, capsys, no_loading):
    import ctxaware.engines
    from ctxaware.cli.main import main

    monkeypatch.setattr(ctxaware.engines, "vllm_available", lambda: True)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if message == "invalid choice" else _nothing():
        rc = main(["niah", *args, "--out", str(out)])
        assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_every_generating_config_takes_the_engine(monkeypatch):
    import ctxaware.engines
    from ctxaware.mtbench import MtBenchConfig
    from ctxaware.niah import NiahConfig
    from ctxaware.sftstudy import SftStudyConfig
    from ctxaware.study import StudyConfig

    monkeypatch.setattr(ctxaware.engines, "vllm_available", lambda: True)
    opts = dict(engine="VLLM", tensor_parallel_size=2, pipeline_parallel_size=2,
                vllm_options='{"gpu_memory_utilization": 0.8}')
    for cls in (NiahConfig, StudyConfig, MtBenchConfig, SftStudyConfig):
        cfg = cls(**opts)
        assert cfg.engine == "vllm" and cfg.vllm_options == {"gpu_memory_utilization": 0.8}
    study = StudyConfig(**opts)
    parts = [*study.niah_configs().values(), *StudyConfig(**opts, mtbench_judge_url="http://x/v1").mtbench_configs()]
    assert all((p.engine, p.tensor_parallel_size, p.pipeline_parallel_size, p.vllm_options)
               == ("vllm", 2, 2, {"gpu_memory_utilization": 0.8}) for p in parts)
    with pytest.raises(MissingDependencyError):
        monkeypatch.setattr(ctxaware.engines, "vllm_available", lambda: False)
        NiahConfig(engine="vllm")


def test_engine_in_the_result_identity(monkeypatch):
    """vLLM answers never reuse transformers answers: MT-Bench conditions and NIH identities differ."""
    import ctxaware.engines
    from ctxaware.mtbench import MtBenchConfig
    from ctxaware.mtbench.config import condition_name

    monkeypatch.setattr(ctxaware.engines, "vllm_available", lambda: True)
    plain = MtBenchConfig(alpha=0.9)
    vllm = MtBenchConfig(alpha=0.9, engine="vllm", tensor_parallel_size=4)
    assert condition_name(plain.condition()) == "chat+steer(alpha=0.9,heads=all)"  # unchanged for transformers
    assert condition_name(vllm.condition()) == "chat+steer(alpha=0.9,heads=all)+engine=vllm"
    assert condition_name(MtBenchConfig(alpha=0.9, engine="vllm", tensor_parallel_size=2).condition()) == \
        condition_name(vllm.condition())  # parallel sizes are run-time settings


def test_study_commands_carry_the_engine(monkeypatch):
    import ctxaware.engines
    from ctxaware.study import StudyConfig
    from ctxaware.study.runner import commands

    monkeypatch.setattr(ctxaware.engines, "vllm_available", lambda: True)
    cmds = commands(StudyConfig(engine="vllm", tensor_parallel_size=2, vllm_options='{"max_model_len": 9000}',
                                mtbench_judge_url="http://x/v1"))
    for name in ("study", "niah", "mtbench"):
        assert "--engine vllm --tensor-parallel-size 2" in cmds[name]
        assert "--vllm-options '{\"max_model_len\": 9000}'" in cmds[name]
    assert "--engine" not in commands(StudyConfig())["niah"]


# ------------------------------------------------------------------ Feeder: which job joins vLLM's batch when
def _job(ids):
    from ctxaware.niah.engine import Job

    return Job(SimpleNamespace(input_ids=list(ids)))


def test_feeder_waits_for_the_prefill_of_a_shared_prefix():
    from ctxaware.vllm.generate import Feeder

    hay = list(range(100))
    jobs = [_job(hay + [1]), _job(hay + [2]), _job([7] * 50), _job(hay[:10] + [3])]
    f = Feeder(jobs, [None] * 4, limit=8, share_min=64)
    assert f.admit() == [0]  # job 1 shares 100 tokens with job 0, which is still prefilling
    assert f.admit() == []
    f.prefilled(0)
    assert f.admit() == [1, 2, 3]  # job 2 and 3 share < 64 tokens with job 1: they join at once
    for i in (0, 1, 2, 3):
        f.finished(i)
    assert f.done


def test_feeder_limit_and_salts():
    from ctxaware.vllm.generate import Feeder

    hay = list(range(100))
    jobs = [_job(hay + [i]) for i in range(4)]
    f = Feeder(jobs, [None, "steered", None, "steered"], limit=2, share_min=64)
    assert f.admit() == [0, 1]  # another salt: no shared cache blocks, so no wait
    assert f.admit() == []  # two in flight
    f.prefilled(0)
    f.finished(0)
    assert f.admit() == [2]  # one slot; job 3 shares with job 1 (same salt, still prefilling)
    f.prefilled(1)
    assert f.admit() == []  # the limit again
    f.finished(1)
    assert f.admit() == [3]
    assert not f.done
    f.finished(2), f.finished(3)
    assert f.done


def test_vllm_engine_module_imports_without_vllm():
    import importlib.util

    import ctxaware.vllm.generate as gen

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(MissingDependencyError, match="--engine vllm needs vLLM"):
            gen.require_vllm()


def test_config_only_model_is_enough_for_the_grid_checks():
    """--engine vllm loads no weights in ctxaware's process: the grid checks read the config only."""
    from transformers import LlamaConfig

    from ctxaware.engines import ConfigOnlyModel
    from ctxaware.niah import NiahConfig
    from ctxaware.niah.runner import check_grid
    from ctxaware.steering import SteeringConfig

    model = ConfigOnlyModel(LlamaConfig(num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=2048), "x")
    with pytest.raises(ConfigError, match="exceed the model's window"):
        check_grid(NiahConfig(lengths="1000,4000"), model, None)
    assert check_grid(NiahConfig(lengths="1000"), model, SteeringConfig(alpha=0.5, heads="0-3")) == [1000]


def test_adapter_merged_once_for_vllm(tmp_path, monkeypatch):
    """vLLM loads no PEFT adapter directory (ctxaware train's LoRA arms): it gets the adapter merged into its base,
    once, in the ctxaware cache; the merged model computes what load_model(adapter) computes."""
    peft = pytest.importorskip("peft")
    import torch
    from test_measure_models import tiny_model
    from test_niah_unit import tiny_tokenizer

    from ctxaware.engines import vllm_model_dir
    from ctxaware.models import load_model

    monkeypatch.setenv("CTXAWARE_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    base = tiny_model("llama", vocab=len(tok), layers=2)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # the adapter names its base by this path
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    merged = vllm_model_dir(str(tmp_path / "adapter"))
    assert merged.startswith(str(tmp_path / "cache")) and vllm_model_dir(str(tmp_path / "adapter")) == merged
    assert vllm_model_dir(str(tmp_path / "base")) == str(tmp_path / "base")  # a plain directory as given
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    ref = load_model(str(tmp_path / "adapter"), dtype="float32", device="cpu").model
    got = load_model(merged, dtype="float32", device="cpu").model
    plain = load_model(str(tmp_path / "base"), dtype="float32", device="cpu").model
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, ref(ids).logits, atol=1e-5)
        assert not torch.allclose(got(ids).logits, plain(ids).logits, atol=1e-3)  # the adapter is in it
