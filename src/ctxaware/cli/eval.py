"""Run contextual-QA tasks (SQuAD, QuAC, DROP) through lm-evaluation-harness, optionally steered.

``ctxaware eval --tasks ctxaware_squad_ind,ctxaware_squad_no_ind --data-dir DIR --limit 50`` evaluates
the embedded default model (or ``--model``) with the ``ctxaware`` lm-eval model class, prints
lm-eval's table and writes ``results.json`` (and ``samples_<task>.jsonl`` with ``--log-samples``)
to ``--out``. ``--alpha`` < 1 steers attention toward the user's turn.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import InputError

HELP = "contextual QA (SQuAD/QuAC/DROP) through lm-eval, with steering and the chat-template switch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..steering.config import SteeringConfig
    from .options import add_config_options, add_model_options

    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names, e.g. "
                        "ctxaware_squad (= _ind, _no_ind, _no_template), ctxaware_drop_ind, ctxaware_qa")
    parser.add_argument("--data-dir", metavar="DIR", help="local data folder (squad/quac/drop files, see docs/eval.md); "
                        "default: $CTXAWARE_DATA_DIR, else the Hugging Face hub")
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions of each task")
    parser.add_argument("--out", metavar="DIR", help="write results.json (and samples with --log-samples) here")
    parser.add_argument("--log-samples", action="store_true", help="also write per-question prompts, outputs, scores")
    parser.add_argument("--batch-size", type=int, default=1, help="generation batch size (default: 1)")
    parser.add_argument("--chat-template", default="task", choices=("task", "on", "off"),
                        help="'task' (default): as each task says (_no_template tasks without); on/off: force it")
    parser.add_argument("--include-path", metavar="DIR", help="extra folder of lm-eval task YAMLs")
    parser.add_argument("--seed", type=int, default=0, help="random seed handed to lm-eval (default: 0)")
    add_model_options(parser)
    group = parser.add_argument_group("steering (off unless --alpha, --steering or --config is given)")
    group.add_argument("--steering", metavar="FILE", help="a steering file (ctxaware calibrate writes one); "
                       "--config and the options below override its fields")
    group.add_argument("--config", metavar="FILE", help="steering config as YAML/JSON (SteeringConfig fields)")
    add_config_options(group, SteeringConfig)


def _task_names(spec: str, task_manager) -> list[str]:
    import difflib

    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise InputError("--tasks is empty; e.g. --tasks ctxaware_squad_ind")
    known = set(task_manager.all_tasks) | set(getattr(task_manager, "all_groups", []) or [])
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; list them with: ctxaware eval --tasks help"
            raise InputError(f"unknown task {name!r}{hint}")
    return names


def write_outputs(results: dict, out: Path, log_samples: bool) -> list[Path]:
    """``results.json`` (+ ``samples_<task>.jsonl``) under ``out``; returns the written paths."""
    from lm_eval.utils import handle_non_serializable

    from ..fsio import atomic_write_json, atomic_write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    written = []
    samples = results.pop("samples", None) if isinstance(results, dict) else None
    # Atomic writes (temp + fsync + rename); samples first, results.json last, so a results.json on
    # disk means every file of the run is complete.
    if log_samples and samples:
        for task, rows in samples.items():
            spath = out / f"samples_{task}.jsonl"
            atomic_write_jsonl(spath, rows, default=handle_non_serializable)
            written.append(spath)
    path = out / "results.json"
    atomic_write_json(path, results, default=handle_non_serializable)
    written.insert(0, path)
    return written


def run(args: argparse.Namespace) -> int:
    from ..errors import require

    lm_eval = require("lm_eval", "eval")
    from lm_eval.utils import make_table

    from ..harness import task_manager
    from ..harness.data import resolve_data_dir
    from ..steering.config import SteeringConfig
    from .options import config_from_args, steering_base

    if not getattr(args, "debug", False):  # lm-eval warns about every custom-dataset task; keep errors only
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    data_dir = resolve_data_dir(args.data_dir)
    # lm-eval's own tasks are indexed (~15 s) only when a requested name is not a ctxaware/--include-path task
    tm_kwargs = dict(data_dir=str(data_dir) if data_dir else None, include_path=args.include_path)
    tm = task_manager(**tm_kwargs, include_defaults=False)
    if args.tasks.strip() == "help":
        print("\n".join(sorted(n for n in tm.all_tasks if n.startswith("ctxaware"))))
        return 0
    known = set(tm.all_tasks) | set(tm.all_groups)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if any(n not in known and not n.startswith("ctxaware") for n in names):
        tm = task_manager(**tm_kwargs)  # an lm-eval task (or a typo), looked up in lm-eval's full index
    tasks = _task_names(args.tasks, tm)
    steering = SteeringConfig(alpha=1.0)
    if args.alpha is not None or args.config or args.steering:
        steering = config_from_args(SteeringConfig, args, base=steering_base(args.steering))
    from ..harness.model import CtxawareLM

    lm = CtxawareLM(pretrained=args.model, steering=steering, chat_template=args.chat_template, dtype=args.dtype,
                    device=args.device, device_map=args.device_map, attn_implementation=args.attn_implementation,
                    trust_remote_code=args.trust_remote_code, batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, log_samples=args.log_samples,
                                      task_manager=tm, random_seed=args.seed, numpy_random_seed=args.seed,
                                      torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    if results is None:  # pragma: no cover - non-zero ranks
        return 0
    print(f"ctxaware ({lm.model_name}; alpha={steering.alpha}, heads={steering.heads}, "
          f"chat template: {args.chat_template}), limit: {args.limit}")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out:
        for path in write_outputs(results, Path(args.out), args.log_samples):
            print(f"wrote {path}")
    return 0
