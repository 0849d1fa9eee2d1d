"""The ``ctxaware`` command: one small subcommand per capability, each a single library call.

Each subcommand lives in ``ctxaware.cli.<name>`` and defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Errors derived from :class:`ctxaware.errors.CtxawareError` (and bad files)
print one line and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__

SUBCOMMANDS = ("chat", "spans", "niah", "attention", "score", "indicate", "train", "eval", "calibrate", "study",
               "report", "serve", "mtbench", "sft-study", "multidoc")


def _load(name: str):
    return importlib.import_module(f"ctxaware.cli.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxaware",
        description="Measure and repair the loss of context awareness in instruction-tuned chat LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"ctxaware {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load(name)
        sp = sub.add_parser(name, help=module.HELP, description=module.__doc__.strip().splitlines()[0]
                            if module.__doc__ else module.HELP)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks and debug logs")
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        import os
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    from ..errors import CtxawareError

    try:
        return int(args._run(args) or 0)
    except (CtxawareError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if debug:
            raise
        print(f"ctxaware {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctxaware {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
