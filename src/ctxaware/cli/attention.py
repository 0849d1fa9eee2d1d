"""Show how attention is shared between roles (system/user/assistant/template) across layers.

``ctxaware attention --messages chat.json`` prints, per layer, the share of attention that the
query tokens (default: the last prompt token, after the generation prompt) pay to each role,
averaged over heads; ``--compare-template`` adds the same content rendered without the chat
template (contents joined by a newline, see ``ctxaware.measure.plain``); ``--plot`` draws it.
"""

from __future__ import annotations

import argparse
import json

HELP = "per-layer share of attention on each role, with or without the chat template"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", required=True, metavar="FILE",
                        help="JSON file: a list of {role, content} or {\"messages\": [...]}")
    parser.add_argument("--queries", choices=("last", "assistant"), default="last",
                        help="query tokens: the last prompt token (with the generation prompt when the chat "
                             "ends with a user turn) or every assistant turn's tokens (default: last)")
    parser.add_argument("--layers", metavar="SPEC", help="layers to measure, e.g. '0-11' or '0,5,10' (default: all)")
    parser.add_argument("--compare-template", action="store_true",
                        help="also measure the same content without the chat template")
    parser.add_argument("--json", action="store_true", help="print the shares as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="save a line plot per role across layers")
    from .options import add_model_options

    add_model_options(parser)


def _parse_layers(spec: str | None) -> list[int] | None:
    from ..errors import ConfigError

    if not spec:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError as exc:
        raise ConfigError(f"--layers must look like '0-11' or '0,5,10', got {spec!r}") from exc
    return out


def run(args: argparse.Namespace) -> int:
    from ..chat import load_messages
    from ..measure import role_shares
    from ..models import load_model
    from .options import model_kwargs

    messages = load_messages(args.messages)
    model, tokenizer = load_model(args.model, **model_kwargs(args))
    result = role_shares(model, tokenizer, messages, queries=args.queries, layers=_parse_layers(args.layers),
                         compare_template=args.compare_template)
    if args.plot:
        from ..measure.plot import plot_role_shares

        series = {name.replace("_", " "): c["shares"] for name, c in result["conditions"].items()}
        what = "last token" if args.queries == "last" else "assistant tokens"
        plot_role_shares(series, result["layers"], args.plot, title=f"attention share by role (queries: {what})")
    if args.json:
        print(json.dumps(result))
        return 0
    roles = ("system", "user", "assistant", "template")
    for name, cond in result["conditions"].items():
        print(f"{name.replace('_', ' ')} ({cond['tokens']} tokens, {cond['queries']} queries)")
        print("layer  " + "  ".join(f"{r:>9}" for r in roles))
        for i, layer in enumerate(result["layers"]):
            print(f"{layer:>5}  " + "  ".join(f"{cond['shares'][r][i]:9.3f}" for r in roles))
    if args.plot:
        print(f"plot saved to {args.plot}")
    return 0
