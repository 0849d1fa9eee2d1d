"""Show which tokens of a rendered conversation belong to which role.

``ctxaware spans --messages chat.json`` colours the rendered chat by role in a terminal;
``--json`` prints the token ids, one role per token, and each message's content span. A token that
straddles a content's edge and a template marker (``.<`` when ``<|eot_id|>`` is plain text to the
tokenizer) counts as template; it is marked ``boundary`` in the text and listed under
``straddling`` in the JSON. The text shown is the rendered text exactly (character offsets).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputFileNotFoundError, TemplateError

HELP = "show the role (system/user/assistant/template) of every token of a rendered chat"

_COLOURS = {"system": "\033[35m", "user": "\033[32m", "assistant": "\033[34m", "template": "\033[2m",
            "boundary": "\033[7;33m"}
_RESET = "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", required=True, metavar="FILE",
                        help="JSON file: a list of {role, content} or {\"messages\": [...]}")
    from .options import add_model_options

    add_model_options(parser, tokenizer_only=True,
                      model_help="model or tokenizer directory / HF id / .gguf (default: embedded)")
    parser.add_argument("--template-file", metavar="T.jinja", help="use this Jinja chat template instead of "
                        "the tokenizer's own")
    parser.add_argument("--generation-prompt", action="store_true", help="append the assistant generation prompt")
    parser.add_argument("--continue-final", action="store_true",
                        help="leave the final assistant message open (a response prefix)")
    parser.add_argument("--json", action="store_true", help="print ids, roles and spans as JSON")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the text by role (default: auto = when stdout is a terminal)")


def _coloured(rendered, colour: bool) -> str:
    """The rendered text exactly (character offsets, not decoded tokens), marked by role; a straddling
    token (content and template characters in one token, counted as template) is marked ``boundary``."""
    flagged = set(rendered.straddling)
    keys = [("boundary" if t in flagged else r) for t, r in enumerate(rendered.roles)]
    starts = [a for a, _ in rendered.offsets]
    pieces = []
    for start, end in _runs(keys):
        c0 = 0 if start == 0 else starts[start]
        c1 = len(rendered.text) if end == len(keys) else starts[end]
        text, key = rendered.text[c0:c1], keys[start]
        pieces.append(f"{_COLOURS[key]}{text}{_RESET}" if colour else f"[{key}]{text}[/{key}]")
    return "".join(pieces)


def _runs(roles: list[str]):
    start = 0
    for i in range(1, len(roles) + 1):
        if i == len(roles) or roles[i] != roles[start]:
            yield start, i
            start = i


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..chat import load_messages, render
    from ..models import load_tokenizer

    messages = load_messages(args.messages)
    template = None
    if args.template_file:
        path = Path(args.template_file)
        if not path.is_file():
            raise InputFileNotFoundError(f"template file not found: {args.template_file}")
        template = path.read_text(encoding="utf-8")
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"the tokenizer of {args.model or 'the embedded model'} has no chat template; "
                            "pass one with --template-file T.jinja")
    rendered = render(tokenizer, messages, add_generation_prompt=args.generation_prompt,
                      continue_final_message=args.continue_final, chat_template=template)
    if args.json:
        print(json.dumps(rendered.to_dict(tokenizer), ensure_ascii=False))
        return 0
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(_coloured(rendered, colour))
    counts = {r: rendered.roles.count(r) for r in ("system", "user", "assistant", "template")}
    print(f"\n{len(rendered)} tokens: " + ", ".join(f"{r} {n}" for r, n in counts.items()))
    for s in rendered.spans:
        print(f"  message {s.message} {s.role} turn {s.turn}: tokens [{s.start}, {s.end}), "
              f"text {rendered.text[s.char_start:s.char_end]!r}")
    for t in rendered.straddling:
        a, b = rendered.offsets[t]
        touched = [s.message for s in rendered.spans if a < s.char_end and b > s.char_start]
        print(f"  boundary token {t} {rendered.text[a:b]!r} straddles message {touched[0] if touched else '?'}'s "
              "content and the template: counted as template (see docs/reliability.md)")
    return 0
