"""Multi-process training saves: a real 2-process ``accelerate launch`` for DDP (CPU, gloo) and FSDP (2 GPUs).

Each run trains a tiny random Llama with LoRA and the ``[IND]`` trainable token for a few steps,
saves through :func:`ctxaware.training.trainer.save_trained`, and is reloaded with
``ctxaware.load_model``; its logits must equal those of a 1-process run of the same steps (same
seed, same samples per optimiser step: per-device batch × processes is the 1-process batch, and
accelerate hands rank r the micro-batches r, r + 2, ... of the same seeded order). This file is
also the training script the launcher runs (``python tests/test_training_multiproc.py OUT BASE``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 3
BATCH = 4  # conversations per optimiser step, all processes together

FSDP_CONFIG = """# FSDP2 over 2 GPUs, checkpoints sharded: save_trained must still write one full adapter
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: false
"""


def _conversations() -> list[list[dict]]:
    """16 distinct short conversations, half of them with an [IND] user turn."""
    topics = ["cats sleep a lot", "the fox jumps", "Paris is the capital of France", "dogs are lazy"]
    out = []
    for i in range(16):
        fact = topics[i % 4]
        user = f"Read the passage: {fact}. Question {i}: what does it say?" + (" [IND]" if i % 2 == 0 else "")
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": f"It says {fact}." * (1 + i % 3)}])
    return out


def _config(out: str, base: str, per_device: int):
    from ctxaware.training.config import TrainConfig

    cpu = os.environ.get("CTXAWARE_MP_DEVICE", "cpu") == "cpu"
    return TrainConfig(model=base, output_dir=out, cpu=cpu, progress=False, max_length=128, learning_rate=1e-2,
                       per_device_train_batch_size=per_device, max_steps=STEPS, logging_steps=1, save_steps=1000,
                       warmup_ratio=0.0, lr_scheduler_type="constant", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       lora_target_modules="q_proj,v_proj", seed=7, sft={"optim": "adamw_torch"})


def _train_main(out: str, base: str) -> None:
    """The launched script: every process builds, trains and saves; rank 0 writes the loss log."""
    import torch

    torch.set_num_threads(1)
    from ctxaware.training.trainer import build_trainer, save_trained

    world = int(os.environ.get("WORLD_SIZE", "1"))
    setup = build_trainer(_config(out, base, BATCH // world), conversations=_conversations())
    setup.trainer.train()
    save_trained(setup)
    if setup.trainer.args.should_save:
        losses = [h["loss"] for h in setup.trainer.state.log_history if "loss" in h]
        (Path(out) / "losses.json").write_text(json.dumps({"world": world, "losses": losses,
                                                            "fsdp": bool(setup.trainer.is_fsdp_enabled),
                                                            "type": str(setup.trainer.accelerator.distributed_type)}))


if __name__ == "__main__":
    _train_main(sys.argv[1], sys.argv[2])
    sys.exit(0)

# ----------------------------------------------------------------------------------------------- tests

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from test_training import CHATS, make_model, make_tokenizer  # noqa: E402

from ctxaware import models  # noqa: E402
from ctxaware.chat import render  # noqa: E402
from ctxaware.training.conditions import indicator_token_id  # noqa: E402

pytestmark = pytest.mark.slow
torch.set_num_threads(1)


def _gloo_available() -> str | None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this build"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
    except OSError as exc:
        return f"cannot open a local TCP port for the rendezvous: {exc}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tok = make_tokenizer("chatml")
    path = tmp_path_factory.mktemp("mp") / "base"
    make_model(len(tok), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _launch(out: Path, base: Path, *launch_args: str, device: str = "cpu") -> dict:
    env = {**os.environ, "CTXAWARE_MP_DEVICE": device, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port", str(_free_port()),
           __file__, str(out), str(base)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"accelerate launch failed (rc {proc.returncode}):\n{tail}")
    return json.loads((out / "losses.json").read_text())


@pytest.fixture(scope="module")
def single(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    return out, _launch(out, base, "--num_processes", "1", "--cpu", "--mixed_precision", "no")


def _logits(path: Path):
    model, tok = models.load_model(str(path), dtype="float32")
    tid = indicator_token_id(tok)
    assert tid is not None
    ids = torch.tensor([render(tok, CHATS[0]).input_ids])
    assert tid in ids[0].tolist()
    with torch.no_grad():
        return model(input_ids=ids).logits, model.get_input_embeddings().weight[tid].clone()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_save_what_one_process_trains(mode, base, single, tmp_path):
    reason = _gloo_available()
    if reason:
        pytest.skip(reason)
    # `--cpu` would make accelerate start one process; torchrun's launcher with use_cpu=True in the
    # training arguments (TrainConfig.cpu) gives two CPU processes on the gloo backend instead
    args = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    device = "cpu"
    if mode == "fsdp":
        # accelerate makes FSDP its distributed type only over accelerator process groups (AcceleratorState:
        # MULTI_CPU is never promoted to FSDP), so on CPU processes an FSDP config silently runs DDP: with
        # FSDP_CONFIG and use_cpu: true, accelerate 1.15 starts 2 gloo processes whose Trainer reports
        # distributed_type MULTI_CPU and is_fsdp_enabled False (checked 2026-12-02)
        if torch.cuda.device_count() < 2:
            pytest.skip("accelerate runs FSDP only on accelerator devices, and this machine has fewer than 2 GPUs")
        device = "cuda"
        cfg = tmp_path / "fsdp.yaml"
        cfg.write_text(FSDP_CONFIG)
        args = ["--config_file", str(cfg)]
    out = tmp_path / mode
    two = _launch(out, base, *args, device=device)
    single_out, one = single
    assert two["world"] == 2 and one["world"] == 1
    assert two["fsdp"] == (mode == "fsdp") and two["type"].endswith("FSDP" if mode == "fsdp" else "MULTI_CPU")
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)  # the same samples per step
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "ctxaware_train.yaml"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    logits_2, row_2 = _logits(out)
    logits_1, row_1 = _logits(single_out)
    base_model, _ = models.load_model(str(base), dtype="float32")
    trained, tok = models.load_model(str(out), dtype="float32")
    assert torch.allclose(row_2, row_1, atol=1e-5)
    assert torch.allclose(logits_2, logits_1, atol=1e-5), (logits_2 - logits_1).abs().max()
    ids = torch.tensor([render(tok, CHATS[1]).input_ids])
    with torch.no_grad():  # training changed the model: the comparison is not between two untrained copies
        before = base_model(input_ids=ids).logits
        after = trained(input_ids=ids).logits[..., : before.shape[-1]]  # the base vocabulary, without [IND]
        assert not torch.allclose(after, before, atol=1e-3)
    shutil.rmtree(out, ignore_errors=True)
