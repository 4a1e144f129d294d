#!/usr/bin/env bash
# The GPU check of issue 7, as one prepared script for a lent GPU machine (e.g. the device tool's H100).
#
#   bash tests/gpu_check.sh            # from the repository root; figures go to $OUT (or ./gpu_results)
#
# It installs nothing: the machine's python3 already holds torch (CUDA), pytorch-lightning, lightning, tensorboard,
# pytest, hypothesis and scikit-learn (see /work/.library/device/KINDS.md). Because `diag.callbacks` is the folder
# `callbacks/` (a package-dir mapping in pyproject.toml), the installed layout is staged under /tmp by copying,
# without pip. Steps, each with its own time limit (at most 9 minutes in all: give the device run timeout_s=600):
#   1. versions and the GPU (env.txt)
#   2. the GPU-marked tests (tests/test_gpu.py): CUDA fp16 AMP, unscaled gradients, grad-scaler skipped steps,
#      bf16 and fp32, the probe on CUDA (gpu_tests.txt)
#   3. the overhead benchmark on CUDA with fp16 AMP (overhead_cuda.txt/.json)
#   4. the overhead benchmark on the machine's (quiet) CPU, one thread (overhead_cpu.txt/.json)
#   5. per-monitor overhead on CUDA for the MLP and the Transformer (overhead_cuda_per_monitor.txt/.json)
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

STAGE=/tmp/diag_gpu_stage
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp -r "$REPO/diag" "$STAGE/diag" && cp -r "$REPO/callbacks" "$STAGE/diag/callbacks" && cp -r "$REPO/tests" "$STAGE/tests"
cp "$REPO/pyproject.toml" "$STAGE/"
cd "$STAGE" || exit 1
export PYTHONPATH="$STAGE" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, pytorch_lightning as pl, tensorboard; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'lightning', pl.__version__)"
  "$PY" -c "import diag.callbacks; print('diag.callbacks from', diag.callbacks.__file__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== GPU-marked tests" | tee "$OUT/gpu_tests.txt"
timeout 200 "$PY" -m pytest tests/test_gpu.py -m gpu -v -rA -p no:cacheprovider --durations=10 2>&1 | tee -a "$OUT/gpu_tests.txt"
echo "exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.txt"

echo "== overhead, CUDA fp16 AMP" | tee "$OUT/overhead_cuda.txt"
timeout 120 "$PY" tests/benchmarks/overhead.py --device cuda --precision 16-mixed --repeats 3 \
  --json "$OUT/overhead_cuda.json" 2>&1 | tee -a "$OUT/overhead_cuda.txt"

echo "== overhead, CPU (one thread)" | tee "$OUT/overhead_cpu.txt"
timeout 120 "$PY" tests/benchmarks/overhead.py --device cpu --repeats 3 --threads 1 \
  --json "$OUT/overhead_cpu.json" 2>&1 | tee -a "$OUT/overhead_cpu.txt"

echo "== overhead per monitor, CUDA fp16 AMP" | tee "$OUT/overhead_cuda_per_monitor.txt"
timeout 100 "$PY" tests/benchmarks/overhead.py --device cuda --precision 16-mixed --repeats 3 --per-monitor \
  --models mlp transformer --json "$OUT/overhead_cuda_per_monitor.json" 2>&1 | tee -a "$OUT/overhead_cuda_per_monitor.txt"

echo "done: $(date -u)" | tee -a "$OUT/env.txt"
