"""``python -m ctxaware`` runs the command-line interface."""

from ctxaware.cli.main import main

raise SystemExit(main())
