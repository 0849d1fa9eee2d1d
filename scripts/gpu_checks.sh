#!/usr/bin/env bash
# GPU checks of issue 20, as one short run on a lent GPU machine (the `device` tool): one Python
# process (benchmarks/gpu_steering.py) that builds random-weight Llama-3.2-1B, Llama-3.1-8B,
# Qwen3-4B and Gemma-3-1B shapes directly on the GPU (nothing built on CPU, nothing saved, no child
# processes) and prints whole-model plain/steered prefill and decode ratios at 2k/8k/32k, the
# profiler's kernel names, peak memory, which steered path each layer call took, and exactness vs
# float64. It stops starting new measurements after --budget-s (200 s) and is killed at 235 s.
#
# Prepare here (CPU), once: the embedded tokenizer as a small directory that travels with the tree
# (the device has no gguf package to convert the embedded model):
#   .venv/bin/python -c "from ctxaware.models import load_tokenizer; load_tokenizer().save_pretrained('.gpu/tokenizer')"
#   mkdir -p .git/info && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude; }
# Check it here first (tiny shapes, seconds):
#   PY=.venv/bin/python bash scripts/gpu_checks.sh --smoke --device cpu
# Run there (python3 has CUDA torch, transformers): carry [".gpu"], timeout_s 300, command
#   bash scripts/gpu_checks.sh
# Extra arguments go to gpu_steering.py (e.g. --models llama-1b --lengths 2048,8192). Tables: $OUT.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# vLLM (issue 29): benchmarks/vllm_steering.py needs vLLM, which the device does not have (its CUDA wheels
# are far larger than what travels with a call); this prints one line (about 1 s). Where vLLM is installed,
# `bash scripts/gpu_checks.sh --vllm [args]` runs that benchmark instead of gpu_steering.py, in the same budget.
if [ "${1:-}" = "--vllm" ]; then
  shift
  timeout 235 "$PY" benchmarks/vllm_steering.py --dtype bfloat16 --no-eager --threads 0 --max-model-len 8192 \
      --niah-lengths 2000,6000 --niah-modes chat,chat+prefix --json "$OUT/vllm_steering.json" "$@" 2>&1 | tee "$OUT/vllm_steering.log" | tail -40
  rc=${PIPESTATUS[0]}
  echo "vllm_steering.py exit status $rc (124: killed at 235 s)"
  exit $rc
fi
timeout 30 "$PY" benchmarks/vllm_steering.py --check | sed 's/$/ (bash scripts\/gpu_checks.sh --vllm runs it where vLLM is installed)/'
TOK=()
[ -d .gpu/tokenizer ] && TOK=(--tokenizer .gpu/tokenizer)
timeout 235 "$PY" benchmarks/gpu_steering.py --device cuda "${TOK[@]}" --out "$OUT" --budget-s 200 "$@" \
    > "$OUT/gpu_steering.log" 2>&1
rc=$?
grep -v '^{\|^USDT\|profiler_st' "$OUT/gpu_steering.log" | tail -60
echo "gpu_steering.py exit status $rc (124: killed at 235 s; the rows so far are in $OUT/gpu_steering.log)"
exit $rc
