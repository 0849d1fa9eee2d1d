"""``python -m ctxaware.harness ARGS``: the stock lm-eval CLI, with ``--model ctxaware`` available.

It registers :class:`~ctxaware.harness.model.CtxawareLM`, adds the shipped task folder to
``--include_path`` (for ``run``, ``ls`` and ``validate``), then hands ``ARGS`` to lm-eval's own
command line unchanged, e.g.::

    python -m ctxaware.harness run --model ctxaware --model_args alpha=0.9 \\
        --tasks ctxaware_squad_ind --metadata data_dir=./data --limit 20
"""

from __future__ import annotations

import sys

from . import TASKS_DIR

_WITH_TASKS = ("run", "ls", "list", "validate")


def with_tasks_dir(argv: list[str]) -> list[str]:
    """``argv`` plus ``--include_path <shipped tasks>`` unless the user gave an include path.

    lm-eval takes a single include path on the command line; a user who gives their own keeps it
    (and can add the ctxaware tasks by symlinking :data:`TASKS_DIR` inside it).
    """
    argv = list(argv)
    if not argv or (argv[0] not in _WITH_TASKS and not argv[0].startswith("-")):
        return argv
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI with the ctxaware model registered and the ctxaware tasks included."""
    from ..errors import require

    require("lm_eval", "eval")
    from lm_eval.__main__ import cli_evaluate

    from . import model  # noqa: F401  (registers "ctxaware")

    args = with_tasks_dir(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0] if sys.argv else "lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
