#!/usr/bin/env bash
# The short GPU check run on a lent H100 within a few minutes of device time (tests/gpu_check.sh is the long one):
# GPU-marked tests (CUDA fp16 AMP: unscaled gradients, grad-scaler skipped steps, the probe), the overhead benchmark
# on CUDA, and the MLP overhead on that machine's quiet CPU.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_results}"; mkdir -p "$OUT"
STAGE=/tmp/diag_gpu_stage; rm -rf "$STAGE" && mkdir -p "$STAGE"
cp -r "$REPO/diag" "$STAGE/diag" && cp -r "$REPO/callbacks" "$STAGE/diag/callbacks" && cp -r "$REPO/tests" "$STAGE/tests"
cd "$STAGE" || exit 1
export PYTHONPATH="$STAGE" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee "$OUT/env.txt"
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/env.txt"
timeout 110 python3 -m pytest tests/test_gpu.py -m gpu -q -rA -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout 100 python3 tests/benchmarks/overhead.py --device cuda --precision 16-mixed --repeats 3 --json "$OUT/overhead_cuda.json" 2>&1 | grep -v "Tip\|stopped\|Seed" | tail -8 | tee "$OUT/overhead_cuda.txt"
timeout 70 python3 tests/benchmarks/overhead.py --device cpu --models mlp --repeats 5 --threads 1 --json "$OUT/overhead_cpu_mlp.json" 2>&1 | grep -v "Tip\|stopped\|Seed" | tail -5 | tee "$OUT/overhead_cpu.txt"
