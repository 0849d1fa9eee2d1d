"""Serve a (steered) model behind the OpenAI chat-completions API, with continuous batching.

``ctxaware serve`` answers ``POST /v1/chat/completions`` (plain or streamed), ``GET /v1/models`` and
``GET /health`` on 127.0.0.1:8000 with the embedded default model; ``--steering FILE`` makes a
steering file the default of every request, and a request's ``"ctxaware": {...}`` field overrides it.
"""

from __future__ import annotations

import argparse

HELP = "OpenAI-compatible HTTP server for a (steered) model, with per-request steering and batching"
EPILOG = """\
request extension (JSON body of POST /v1/chat/completions, all keys optional):
  "ctxaware": {"alpha": 0.9, "heads": "0-11", "emphasis": "user" | "last_user" | "system+user",
               "indicator": true}
  fields given override the server's --steering file (or SteeringConfig's defaults); alpha 1 = unsteered;
  indicator appends " [IND]" to the last user turn. The response's "ctxaware" object says what was applied.
  With the openai client: client.chat.completions.create(..., extra_body={"ctxaware": {"alpha": 0.9}})

examples:
  ctxaware serve
  ctxaware serve --model HuggingFaceTB/SmolLM2-360M-Instruct --steering runs/cal/steering.yaml --port 8080
  curl -s localhost:8000/v1/chat/completions -d '{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..serve.config import ServeConfig
    from .options import add_config_options, add_model_options

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_model_options(parser)
    parser.add_argument("--steering", metavar="FILE", help="steering file (ctxaware calibrate's steering.yaml, or "
                        "SteeringConfig YAML/JSON) applied to requests that do not say otherwise (default: unsteered)")
    parser.add_argument("--served-name", metavar="NAME", help="model id reported by /v1/models and in responses "
                        "(default: the --model value)")
    parser.add_argument("--config", metavar="FILE", help="server settings as YAML/JSON (ServeConfig fields)")
    add_config_options(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..serve import build_app, serve_forever
    from ..serve.config import ServeConfig
    from ..steering.file import load_steering_file
    from .options import config_from_args, model_kwargs

    config = config_from_args(ServeConfig, args)
    steering = load_steering_file(args.steering) if args.steering else None
    loaded = load_model(args.model, **model_kwargs(args))
    app = build_app(loaded.model, loaded.tokenizer, args.served_name or loaded.name, config, steering)
    serve_forever(app, config)
    return 0
