"""Ask the model one question and print its greedy reply, optionally with attention steering.

``ctxaware chat "What is the capital of France?"`` answers with the embedded default model;
``--alpha 0.9`` steers attention toward the user's turn (``--heads`` selects layers/heads).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError

HELP = "one greedy reply from the model (optionally steered toward the user's turn)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..steering.config import SteeringConfig
    from .options import add_config_options

    parser.add_argument("message", nargs="?", help="the user message (read from stdin when omitted and "
                        "--messages is not given)")
    parser.add_argument("--messages", metavar="FILE", help="a JSON conversation (list of {role, content}) "
                        "to continue instead of a single message")
    parser.add_argument("--model", help="HF id, local directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--system", help="system prompt (default: none; the template may insert its own)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens to generate (default: 256)")
    parser.add_argument("--json", action="store_true", help='print {"reply": ...} as JSON')
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                        help="model dtype (default: float32)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    group = parser.add_argument_group("steering (off unless --alpha or --config is given)")
    group.add_argument("--config", metavar="FILE", help="steering config as YAML/JSON (SteeringConfig fields)")
    add_config_options(group, SteeringConfig)


def _messages(args: argparse.Namespace) -> list[dict]:
    from ..chat import load_messages, validate_messages

    if args.messages:
        messages = load_messages(args.messages)
        if args.message:
            messages = [*messages, {"role": "user", "content": args.message}]
    else:
        text = args.message if args.message is not None else (sys.stdin.read() if not sys.stdin.isatty() else "")
        if not text.strip():
            raise InputError("no message given: pass MESSAGE, pipe it on stdin, or use --messages FILE")
        messages = [{"role": "user", "content": text}]
    if args.system is not None:
        messages = [m for m in messages if m.get("role") != "system"]
        messages.insert(0, {"role": "system", "content": args.system})
    return validate_messages(messages)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    messages = _messages(args)
    from ..models import load_model
    from ..steering import SteeredModel, SteeringConfig
    from .options import config_from_args

    steering = None
    if args.alpha is not None or args.config:
        steering = config_from_args(SteeringConfig, args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    reply = SteeredModel(model, tokenizer, steering).chat(messages, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"reply": reply}, ensure_ascii=False))
    else:
        print(reply)
    return 0
