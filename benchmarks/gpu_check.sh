#!/usr/bin/env bash
# GPU check (issue 3), one script, about 8 minutes on one H100/H200 (the steps' timeouts sum to 500 s):
#   1. the CUDA-marked tests and the Triton-kernel tests, natively (pytest -m "gpu or kernels")
#   2. the training-throughput benchmark (full configuration)
#   3. the loss benchmark               (benchmarks/loss_bench.py, when present)
#   4. a time-boxed cifar10-fast run    (--time-limit, on a copy of the CIFAR-10 archive)
# Results (JSON, logs, metrics.jsonl, config.json, host.json, a summary) go to $OUT.
#
# Usage, from the repository root (nothing is installed or downloaded):
#   OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh
# Settings (environment):
#   OUT           results folder (default: benchmarks/results/gpu_check)
#   CIFAR_ARCHIVE CIFAR-10 image-folder archive (default: .data/cifar10-jpeg.tar.gz, an ignored
#                 folder; copy ../shared/data/cifar10-jpeg.tar.gz there before carrying the tree;
#                 with SMOKE=1: a generated 48-image archive in CIFAR-10's layout)
#   EPOCHS        epochs of the cifar10-fast run (default 30: its cosine schedule completes in the box)
#   TIME_LIMIT    seconds of cifar10-fast training, data decoding and compilation included (default 110)
#   PYTHON        interpreter with torch + CUDA (default: python3)
#   SMOKE=1       rehearsal on a machine without a GPU (tests/test_gpu_check.py runs it in CI): every step
#                 in its smallest configuration (benchmarks --quick, a 2-epoch x 2-step run of batch 16),
#                 results named "<device>-smoke", so the script itself is known to work before device time
#                 is spent on it
# Every step has its own timeout; a failing step is recorded and the next one still runs;
# the exit status is non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/gpu_check}"
PY="${PYTHON:-python3}"
ARCHIVE="${CIFAR_ARCHIVE:-}"
TIME_LIMIT="${TIME_LIMIT:-110}"
EPOCHS="${EPOCHS:-30}"
SMOKE="${SMOKE:-0}"
WORK="$(mktemp -d /tmp/isfe-gpu-check.XXXXXX)"   # big files (dataset cache, checkpoints) stay out of $OUT
trap 'rm -rf "$WORK"' EXIT
export ISFE_CACHE="$WORK/cache"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
T_ALL=$(date +%s)

run_step() {  # run_step NAME TIMEOUT_SECONDS CMD... ; log in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
  tail -n 5 "$OUT/$name.log"
}

# 0. what machine this is
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
EOF
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
"$PY" benchmarks/common.py > "$OUT/host.json" 2>&1   # CPU model and ISA flags, cores, load, versions
DEV=$("$PY" -c "import torch; from benchmarks.common import device_tag; print(device_tag('cuda') if torch.cuda.is_available() else 'no-cuda')")
if [ "$SMOKE" = "1" ]; then
  [ "$DEV" = "no-cuda" ] && DEV=cpu
  DEV="$DEV-smoke"
  QUICK=(--quick)
  MARKS="gpu"  # the kernel tests already run (interpreted) in the test suite that calls this rehearsal
  RUN_OPTS=(--epochs 2 --warmup-epochs 0.5 --max-steps-per-epoch 2 --batch-size 16 --eval-every 1 --log-every 1)
  if [ -z "$ARCHIVE" ]; then  # a tiny archive in CIFAR-10's layout (the kNN monitor on the real one takes minutes on a CPU)
    ARCHIVE="$WORK/tiny-cifar10.tar.gz"
    "$PY" - "$ARCHIVE" <<'EOF'
import io, sys, tarfile
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
with tarfile.open(sys.argv[1], "w:gz") as tf:
    for split, n in (("train", 12), ("test", 4)):
        for c in ("airplane", "cat", "ship"):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
                info = tarfile.TarInfo(f"cifar10/{split}/{c}/{i:04d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)
EOF
  fi
else
  if [ "$DEV" = "no-cuda" ]; then
    echo "no CUDA device: this script is for a GPU machine (SMOKE=1 rehearses it without one)" | tee -a "$SUMMARY"
    exit 2
  fi
  QUICK=()
  MARKS="gpu or kernels"
  RUN_OPTS=(--epochs "$EPOCHS" --eval-every 10 --log-every 50)
fi
ARCHIVE="${ARCHIVE:-.data/cifar10-jpeg.tar.gz}"

# 1. CUDA-marked tests and every Triton-kernel test (native here, interpreted in CI), from the modules that hold
#    them (the others may import packages the GPU machine lacks)
mapfile -t GPU_TESTS < <(grep -lE "mark\.(gpu|kernels)" tests/test_*.py)
run_step pytest_gpu 120 "$PY" -m pytest -m "$MARKS" -q -p no:cacheprovider -o addopts="" -rs "${GPU_TESTS[@]}"

# 2. training throughput, full configuration (batch 512, ResNet-18 32x32)
run_step train_throughput 150 "$PY" benchmarks/train_throughput.py ${QUICK[@]+"${QUICK[@]}"} --out "$OUT/train_throughput-$DEV.json"

# 3. loss benchmark (written by another issue; skipped when absent)
if [ -f benchmarks/loss_bench.py ]; then
  run_step loss_bench 60 "$PY" benchmarks/loss_bench.py ${QUICK[@]+"${QUICK[@]}"} --out "$OUT/loss_bench-$DEV.json"
else
  echo "loss_bench skipped: benchmarks/loss_bench.py not present" | tee -a "$SUMMARY"
fi

# 4. time-boxed cifar10-fast training on the carried archive
if [ -f "$ARCHIVE" ]; then
  RUN="$WORK/cifar10-fast"
  run_step cifar10_fast $((TIME_LIMIT + 60)) "$PY" -m training --preset cifar10-fast --data "$ARCHIVE" \
    "${RUN_OPTS[@]}" --time-limit "$TIME_LIMIT" --out "$RUN"
  cp "$RUN/metrics.jsonl" "$RUN/config.json" "$OUT/" 2>/dev/null
  DEV_NAME=()
  [ "$SMOKE" = "1" ] && DEV_NAME=(--device "cpu (SMOKE rehearsal)")
  "$PY" benchmarks/run_result.py "$RUN" --out "$OUT/cifar10_fast-$DEV.json" --preset cifar10-fast \
    --time-limit "$TIME_LIMIT" ${DEV_NAME[@]+"${DEV_NAME[@]}"} || FAILED=$((FAILED + 1))
else
  echo "cifar10_fast skipped: $ARCHIVE not found (copy ../shared/data/cifar10-jpeg.tar.gz to .data/ and carry .data)" | tee -a "$SUMMARY"
  FAILED=$((FAILED + 1))
fi

echo "total seconds=$(( $(date +%s) - T_ALL )) failed_steps=$FAILED" | tee -a "$SUMMARY"
[ "$FAILED" -eq 0 ]
