"""Benchmark: step time of ``ctxaware train`` vs a plain TRL ``SFTTrainer`` on the same data and model.

Both train the same model with the same ``SFTConfig`` (built from one :class:`TrainConfig`) and
LoRA settings on the same conversations. Plain TRL tokenises the ``messages`` itself (full-sequence
loss, no ``[IND]`` token); ctxaware renders with role spans, supervises assistant turns only, adds
``[IND]`` as a trainable special token when the data carry it, and patches the fused LM head for
PEFT's trainable tokens. Prints the median optimiser-step time of each (after warm-up steps) and
the ratio; the target is ctxaware within 5 % of plain TRL. A third run with ``indicator: false``
separates the cost of the trainable ``[IND]`` row (PEFT rebuilds the merged embedding matrix every
forward, which dominates on the tiny ``--quick`` model whose vocabulary dwarfs its layers).

    python benchmarks/sft_overhead.py --quick        # tiny random model, seconds
    python benchmarks/sft_overhead.py                # embedded SmolLM2-135M, LoRA (CPU: slow, see docs/training.md)
    python benchmarks/sft_overhead.py --steps 8 --batch-size 2 --max-length 256 --rounds 1   # a lighter CPU run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instructions" / "converted" \
    / "messages_mixed.jsonl"
FILLER = "The harbour town keeps its boats in the bay through the long winter. "


def _conversations(path: Path, n: int) -> list[list[dict]]:
    """``n`` conversations from ``path`` (every other user turn marked ``[IND]``), or synthetic ones."""
    convs: list[list[dict]] = []
    if path.is_file():
        from ctxaware.scoring import load_conversations

        for row in load_conversations(path):
            msgs = row["messages"]
            if any(m["role"] == "assistant" and m["content"] for m in msgs) and msgs[0]["role"] != "assistant":
                convs.append(msgs)
            if len(convs) == n:
                break
    if not convs:
        print(f"(no data at {path}; using synthetic conversations)", file=sys.stderr)
        convs = [[{"role": "user", "content": FILLER * (1 + i % 4) + "What is kept in the bay?"},
                  {"role": "assistant", "content": "Boats. " + FILLER * (1 + i % 2)}] for i in range(n)]
    out = []
    for i, msgs in enumerate(convs):
        msgs = [dict(m) for m in msgs]
        if i % 2 == 0:
            first_user = next(m for m in msgs if m["role"] == "user")
            first_user["content"] += " [IND]"
        out.append(msgs)
    return out


class StepTimer:
    """A ``TrainerCallback`` recording the wall time of every optimiser step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer._t0)

        self.times: list[float] = []
        self._t0 = 0.0
        self.callback = _CB()

    def median(self, warmup: int) -> float:
        times = self.times[warmup:] or self.times
        return statistics.median(times)


def _tiny(tmp: Path) -> str:
    """A tiny random Llama + the embedded tokenizer, saved to ``tmp`` (for --quick)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxaware.models import load_tokenizer

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    return str(tmp / "tiny")


def run_plain_trl(config, convs, steps: int, warmup: int) -> float:
    from datasets import Dataset
    from trl import SFTTrainer

    from ctxaware.models import load_model
    from ctxaware.training.trainer import peft_config_for

    model, tok = load_model(config.model, dtype="float32")
    timer = StepTimer()
    args = config.sft_config(on_gpu=False)
    args.dataset_kwargs = None  # let TRL tokenise the messages itself
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": c} for c in convs]),
                         processing_class=tok, peft_config=peft_config_for(config, model, None)
                         if config.method == "lora" else None, callbacks=[timer.callback])
    trainer.train()
    return timer.median(warmup)


def run_ctxaware(config, convs, steps: int, warmup: int) -> float:
    from ctxaware.training.trainer import build_trainer

    timer = StepTimer()
    setup = build_trainer(config, conversations=convs)
    setup.trainer.add_callback(timer.callback)
    setup.trainer.train()
    return timer.median(warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, few steps (a smoke test)")
    parser.add_argument("--model", default="embedded", help="model to train (default: embedded SmolLM2-135M)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="conversations (JSONL with messages)")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run (default: 12)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the three runs; each side "
                        "reports its best median (default: 2)")
    args = parser.parse_args(argv)

    import torch

    from ctxaware.training.config import TrainConfig

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        model = _tiny(Path(tmp)) if args.quick else args.model
        steps = 6 if args.quick else args.steps
        convs = _conversations(args.data, steps * args.batch_size)
        config = TrainConfig(model=model, output_dir=str(Path(tmp) / "out"), method=args.method, cpu=True,
                             max_steps=steps, per_device_train_batch_size=args.batch_size,
                             max_length=args.max_length, save_steps=10_000, logging_steps=10_000, progress=False,
                             lr_scheduler_type="constant", warmup_ratio=0.0, dtype="float32",
                             sft={"optim": "adamw_torch", "save_strategy": "no"})
        # alternate runs so that machine noise hits both; report each side's best median
        plain, ours, vanilla = [], [], []
        for _ in range(1 if args.quick else max(1, args.rounds)):
            plain.append(run_plain_trl(config, convs, steps, args.warmup))
            ours.append(run_ctxaware(config, convs, steps, args.warmup))
            vanilla.append(run_ctxaware(config.replace(indicator=False), convs, steps, args.warmup))
    p, o, v = min(plain), min(ours), min(vanilla)
    print(f"model: {model if not args.quick else 'tiny random Llama (--quick)'} · {args.method} · "
          f"{steps} steps of {args.batch_size} conversations · max_length {args.max_length}")
    print(f"plain TRL SFTTrainer : {p * 1000:8.1f} ms/step (median)")
    print(f"ctxaware train       : {o * 1000:8.1f} ms/step (median)")
    print(f"  same, --no-indicator: {v * 1000:7.1f} ms/step (no [IND] token: no trainable-token rows)")
    print(f"ratio ctxaware/plain : {o / p:.3f}  (target <= 1.05); without [IND]: {v / p:.3f}")
    print()
    print("| run | median s/step | ratio to plain TRL |")
    print("|---|---|---|")
    print(f"| plain TRL `SFTTrainer` | {p:.2f} | 1.000 |")
    print(f"| `ctxaware train` (with `[IND]`, trainable token row) | {o:.2f} | {o / p:.3f} |")
    print(f"| `ctxaware train --no-indicator` | {v:.2f} | {v / p:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
