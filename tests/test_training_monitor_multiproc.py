"""The context-awareness monitor under ``accelerate launch`` with 2 CPU processes (DDP on gloo).

Two launches of the same 2-process LoRA training (tiny random Llama, 4 steps): without the monitor,
and with it probing every step and a stopping rule that fires at step 2. The monitored run must
finish (the non-main process waits for the main one's probe without deadlock), write each step once
(the main process alone), give every process the same logged values and the same stop at step 2,
and train exactly as the unmonitored run up to there. This file is also the launched script
(``python tests/test_training_monitor_multiproc.py OUT BASE MONITOR``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

PROBE = dict(lengths="160", depths="0,100", reserve=60, max_new_tokens=4, attention_length=160,
             attention_depths="50")


def _main(out: str, base: str, monitor: bool) -> None:
    import torch

    torch.set_num_threads(1)
    from test_training_multiproc import BATCH, _config, _conversations

    from ctxaware.training.trainer import build_trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = _config(out, base, BATCH // world).replace(max_steps=4, lora_dropout=0.1)
    if monitor:
        cfg = cfg.replace(monitor=True, monitor_every=1, monitor_stop_gap=-0.999, monitor_stop_patience=2,
                          monitor_options=PROBE)
    setup = build_trainer(cfg, conversations=_conversations())
    setup.trainer.train()
    rank = setup.trainer.args.process_index
    history = setup.trainer.state.log_history
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "losses": [h["loss"] for h in history if "loss" in h],
        "context": [h for h in history if "context/template_gap" in h], "step": setup.trainer.state.global_step}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
    sys.exit(0)

# ----------------------------------------------------------------------------------------------- tests

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from test_training_multiproc import _free_port, _gloo_available, base  # noqa: E402,F401  (base: a fixture)

pytestmark = pytest.mark.slow


def _launch(out: Path, base: Path, monitor: bool) -> list[dict]:
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), __file__, str(out), str(base),
           "1" if monitor else "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"accelerate launch failed (rc {proc.returncode}):\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_probe_once_on_the_main_one_and_stop_together(base, tmp_path):  # noqa: F811
    reason = _gloo_available()
    if reason:
        pytest.skip(reason)
    plain = _launch(tmp_path / "plain", base, False)
    watched = _launch(tmp_path / "watched", base, True)
    assert [r["world"] for r in watched] == [2, 2]
    assert [r["step"] for r in plain] == [4, 4] and [r["step"] for r in watched] == [2, 2]  # both stopped at 2
    assert watched[0]["losses"] == plain[0]["losses"][:2]  # training unchanged up to the stop
    assert watched[0]["context"] == watched[1]["context"] and [h["step"] for h in watched[0]["context"]] == [0, 1, 2]
    lines = [json.loads(x) for x in (tmp_path / "watched" / "context_awareness.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]  # written once, by the main process
    assert (tmp_path / "watched" / "checkpoint-2").is_dir()  # the stop saved a checkpoint
