#!/usr/bin/env bash
# GPU checks and benchmarks of issue 11, as one short run on a lent GPU machine (the `device` tool).
#
# Prepare here (CPU): the embedded tokenizer as a small directory that travels with the tree:
#   .venv/bin/python -c "from ctxaware.models import load_tokenizer; load_tokenizer().save_pretrained('.gpu/tokenizer')"
#   echo /.gpu/ >> .git/info/exclude
# Run there (python3 has CUDA torch, transformers, accelerate, peft): carry [".gpu"], command
#   bash scripts/gpu_checks.sh
# It builds a random-weight Llama-3.2-1B-shaped model (bf16) and writes every table under $OUT.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src:benchmarks PYTHONUNBUFFERED=1
PY=${PY:-python3}
MODEL=/tmp/llama-1b
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY scripts/random_model.py --preset llama-1b --dtype bfloat16 --tokenizer .gpu/tokenizer --out $MODEL 2>&1 | tail -1
$PY benchmarks/steering_overhead.py --model $MODEL --device cuda --dtype bfloat16 --lengths 2048,8192 \
    --new-tokens 16 --out "$OUT/steering_overhead.json" 2>&1 | tee "$OUT/steering_overhead.md" | tail -20
$PY benchmarks/niah_throughput.py --grid tiny --model $MODEL --device cuda --dtype bfloat16 2>&1 \
    | tee "$OUT/niah_throughput.md" | tail -12
$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 \
    | tee "$OUT/pytest.txt" | tail -5
