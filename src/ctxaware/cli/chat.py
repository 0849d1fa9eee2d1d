"""Ask the model one question and print its greedy reply, optionally with attention steering.

``ctxaware chat "What is the capital of France?"`` answers with the embedded default model;
``--alpha 0.9`` steers attention toward the user's turn (``--heads`` selects layers/heads).
Steering is on as soon as any steering option (or ``--config``) is given.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError

HELP = "one greedy reply from the model (optionally steered toward the user's turn)"
EPILOG = """\
head SPEC syntax (--heads; 0-based indices, inclusive ranges, query heads under GQA):
  all             every head of every layer (default)
  0-11            every head of layers 0 to 11
  0,2,5           every head of layers 0, 2 and 5
  3:0,5;7:all     heads 0 and 5 of layer 3, and every head of layer 7
  all:0-3         heads 0 to 3 of every layer
Groups LAYERS[:HEADS] are separated by ";"; indices are checked against the model.

examples:
  ctxaware chat "Hi"
  ctxaware chat "Hi" --alpha 0.9 --heads 0-11
  ctxaware chat --messages chat.json --alpha 0.5 --emphasis last_user --json
  ctxaware chat "Hi" --steering runs/calib/steering.yaml --device cuda --dtype bfloat16
  ctxaware chat "The capital of France is" --model BASE_DIR --no-template
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..steering.config import SteeringConfig
    from .options import add_config_options, add_model_options

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("message", nargs="?", help="the user message (read from stdin when omitted and "
                        "--messages is not given)")
    parser.add_argument("--messages", metavar="FILE", help="a JSON conversation (list of {role, content}) "
                        "to continue instead of a single message")
    parser.add_argument("--system", help="system prompt (default: none; the template may insert its own)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens to generate (default: 256)")
    parser.add_argument("--json", action="store_true", help='print {"reply": ...} as JSON')
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--template-file", metavar="FILE", help="a Jinja chat template to render with instead "
                          "of the tokenizer's own (e.g. for a base model without one)")
    template.add_argument("--no-template", action="store_true", help="no chat template: the message contents "
                          "joined by newlines as a raw text prompt (base models; the paper's no-template case)")
    add_model_options(parser)
    group = parser.add_argument_group("steering (off unless one of these options is given; then --alpha "
                                      "defaults to 0.95)")
    group.add_argument("--steering", metavar="FILE", help="a steering file (ctxaware calibrate writes one); "
                       "--config and the options below override its fields")
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


def _template(path: str | None) -> str | None:
    if not path:
        return None
    from pathlib import Path

    from ..errors import InputFileNotFoundError

    p = Path(path)
    if not p.is_file():
        raise InputFileNotFoundError(f"--template-file {path!r} not found; pass a Jinja chat template file")
    return p.read_text(encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    messages = _messages(args)
    from ..models import load_model
    from ..steering import SteeredModel, SteeringConfig
    from .options import config_from_args, model_kwargs, steering_base

    steering = None
    if args.steering or args.config or any(getattr(args, n, None) is not None for n in SteeringConfig.field_names()):
        steering = config_from_args(SteeringConfig, args, base=steering_base(args.steering))
    template = _template(args.template_file)
    model, tokenizer = load_model(args.model, **model_kwargs(args))
    steered = SteeredModel(model, tokenizer, steering, chat_template=template)
    if args.no_template:
        from ..measure.plain import render_plain

        reply = steered.generate_rendered([render_plain(tokenizer, messages)], max_new_tokens=args.max_new_tokens)[0]
    else:
        reply = steered.chat(messages, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"reply": reply}, ensure_ascii=False))
    else:
        print(reply)
    return 0
