"""Command-line interface: ``ctxaware <command>``; see :mod:`ctxaware.cli.main`."""
