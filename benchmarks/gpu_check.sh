#!/usr/bin/env bash
# One prepared check of cellseg's GPU path (issue 15, item 1): about 4-8 minutes on one GPU, from a bare
# machine with the repo checked out.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# Steps, in order, each with its own timeout; a failed step is recorded FAILED and the next one runs:
#   0 install      the README's install command (`make install`), timed
#   1 cuda-tests   the tests that skip without CUDA (a skip here counts as a failure)
#   2 train-step   one training step (benchmarks/train_step.py): ours vs smp / fastai (when installed),
#                  bf16 autocast with channels-last off and on; images/s and % of the GPU's bf16 dense peak
#                  (datasheet table in benchmarks/gpu_check_report.py, and a bf16 matmul measured here)
#   3 batches      batch construction resident on the GPU vs the CPU paths (benchmarks/data_loading.py)
#   4 training     a synthetic store at 400 px (GPU_CHECK_STACKS stacks, default 96), `cellseg train`
#                  2 frozen + 8 unfrozen epochs on CUDA: wall time, final metrics, projected `paper` time
#   5 torchrun     `torchrun --nproc-per-node 1 cellseg train …` (NCCL), one epoch on the same store
# It prints one markdown table (step, status, wall s, key figure) and writes it to OUT/summary.md, with one
# log per step beside it (7 files: the device runner brings back at most 8). Scratch data (stores, runs,
# mlflow.db) goes to a temporary folder that is removed at the end.
#
# OUT: --out DIR, else $OUT (the device runner's folder), else benchmarks/gpu_check_out.
# --dry-run: every step prints the exact command it would run and is SKIPPED; nothing is installed or run.
# GPU_CHECK_BUDGET (default 480 s): total wall-clock budget; a step gets min(its timeout, what is left) and
# is SKIPPED (no time left) when under 15 s remain. GPU_CHECK_STACKS: stacks of the training store.
# GPU_CHECK_DEVICE (default cuda) and GPU_CHECK_SIZE (default 400): device and size of steps 4 and 5, for a
# smoke run of those steps on a CPU (e.g. GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=48 GPU_CHECK_STACKS=8).
# GPU_CHECK_INSTALL replaces `make install` where it cannot work (a machine without network: e.g. a venv with
# --system-site-packages over the image's torch plus carried wheels); later steps need .venv/bin/python and
# .venv/bin/cellseg. torchrun is run as `python -m torch.distributed.run` (the same program), so that it is
# found in such a venv too.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY=0
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT_DIR=$2; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option '$1' (usage: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR])" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT_DIR=${OUT_DIR:-benchmarks/gpu_check_out}
mkdir -p "$OUT_DIR" || { echo "error: cannot create output folder $OUT_DIR" >&2; exit 1; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-480}
STACKS=${GPU_CHECK_STACKS:-96}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SIZE=${GPU_CHECK_SIZE:-400}
CELLS=$((STACKS * 275 / 450))          # the paper's trainer set: 275 stacks with cells, 175 controls
NEGATIVES=$((STACKS - CELLS))
if [ "$DRY" = 1 ]; then
  WORK='$WORK'                          # printed as is: the real run makes a temporary folder
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/cellseg-gpu-check.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
PY=$ROOT/.venv/bin/python
CELLSEG=$ROOT/.venv/bin/cellseg
REPORT="$PY $ROOT/benchmarks/gpu_check_report.py"
export PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"

T0=$SECONDS
echo "GPU check: output in $OUT_DIR, scratch folder (WORK) $([ "$DRY" = 1 ] && echo "a temporary folder" || echo "$WORK"), budget $BUDGET s"
ROWS=()

# step NAME TIMEOUT_S LOG COMMAND: run COMMAND with bash under a timeout, output to OUT/LOG; its key figure is
# the last `KEY: …` line of the log, else the log's last line.
step() {
  local name=$1 limit=$2 log=$3 cmd=$4 left status key start rc wall
  echo
  echo "== $name (timeout ${limit} s, log $log)"
  echo "   $cmd"
  if [ "$DRY" = 1 ]; then
    ROWS+=("| $name | SKIPPED (dry run) | | \`$log\` |")
    return
  fi
  left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 15 ]; then
    echo "   SKIPPED: the ${BUDGET} s budget is spent" | tee "$OUT_DIR/$log"
    ROWS+=("| $name | SKIPPED (no time left) | | |")
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  start=$SECONDS
  (cd "$ROOT" && timeout -k 10 "$limit" bash -c "$cmd") >"$OUT_DIR/$log" 2>&1 </dev/null
  rc=$?
  wall=$((SECONDS - start))
  case $rc in
    0) status=OK ;;
    124|137) status="FAILED (timeout ${limit} s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  key=$(grep '^KEY: ' "$OUT_DIR/$log" | tail -n 1 | cut -c6-)
  [ -n "$key" ] || key=$(grep -E '^(error|[A-Za-z.]*Error)\b' "$OUT_DIR/$log" | tail -n 1)
  [ -n "$key" ] || key=$(grep -v '^[[:space:]]*$' "$OUT_DIR/$log" | tail -n 1)
  key=$(printf '%s' "$key" | tr -d '\r' | sed 's/|/\\|/g' | cut -c1-140)
  echo "   $status in ${wall} s: $key"
  ROWS+=("| $name | $status | $wall | $key |")
}

CUDA_TESTS="tests/test_codes.py::test_apply_on_cuda_matches_cpu tests/test_dataset.py::test_batches_on_cuda_match_cpu tests/test_engine_augment.py::test_runs_on_the_gpu"
STEP_ARGS="--device cuda --malloc default --warmup 3 --reps 10"
TRAIN_ARGS="--data data/trainer.zarr --profile paper --strategy fluorescence --size $SIZE --device $DEVICE --no-register"

INSTALL=${GPU_CHECK_INSTALL:-make install}
step "0 install: $INSTALL" 240 0-install.log \
  "$INSTALL && echo \"KEY: install took \$SECONDS s\""

step "1 CUDA-only tests" 120 1-cuda-tests.log \
  "out=\$($PY -m pytest -q -p no:cacheprovider -rs $CUDA_TESTS 2>&1); rc=\$?; echo \"\$out\"; [ \$rc = 0 ] || exit \$rc; if grep -q skipped <<<\"\$out\"; then echo 'KEY: tests skipped: CUDA not seen'; exit 1; fi"

step "2 one training step (bf16; channels-last off, on)" 180 2-train-step.log \
  "$REPORT peak --out $WORK/peak.json; $PY benchmarks/train_step.py $STEP_ARGS --amp bf16 --json-out $WORK/step-bf16.json && $PY benchmarks/train_step.py $STEP_ARGS --amp bf16 --channels-last --json-out $WORK/step-bf16-cl.json; rc=\$?; $REPORT train-step $WORK/peak.json $WORK/step-bf16.json $WORK/step-bf16-cl.json || rc=1; exit \$rc"

step "3 batch construction (GPU-resident vs CPU)" 120 3-batches.log \
  "$PY benchmarks/data_loading.py --json-out $WORK/batches.json && $REPORT batches $WORK/batches.json"

step "4 short training (2 + 8 epochs, $SIZE px, $STACKS stacks, $DEVICE)" 300 4-training.log \
  "cd $WORK && $CELLSEG data synth data/trainer --layout trainer --cells $CELLS --negatives $NEGATIVES --size $SIZE --seed 0 && $CELLSEG data ingest data/trainer --out data/trainer.zarr --layout trainer && t=\$SECONDS && $CELLSEG train $TRAIN_ARGS --epochs-frozen 2 --epochs 8 --run-dir runs/short && $REPORT training runs/short mlflow.db --stacks $STACKS --wall \$((SECONDS - t))"

step "5 torchrun --nproc-per-node 1 ($([ "$DEVICE" = cpu ] && echo gloo || echo NCCL)), 1 epoch" 120 5-torchrun.log \
  "cd $WORK && NCCL_DEBUG=INFO $PY -m torch.distributed.run --nproc-per-node 1 $CELLSEG train $TRAIN_ARGS --epochs-frozen 0 --epochs 1 --run-dir runs/ddp 2>&1 | tee ddp.txt; rc=\${PIPESTATUS[0]}; v=\$(grep -o -m1 'NCCL version [^ ]*' ddp.txt); [ \$rc = 0 ] && echo \"KEY: 1 epoch on 1 process, \${v:-no NCCL line seen}\"; exit \$rc"

# the machine, as far as it can be read without the venv
if command -v nvidia-smi >/dev/null 2>&1; then
  GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
fi
MACHINE="${GPU:-no GPU seen}; $(nproc 2>/dev/null || echo '?') CPUs; $(uname -m)"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
MODE=$([ "$DRY" = 1 ] && echo ' (dry run)' || true)
{
  echo "GPU check$MODE, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, $MACHINE, total $((SECONDS - T0)) s"
  echo
  echo "| step | status | wall s | key figure |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$OUT_DIR/summary.md"
echo
cat "$OUT_DIR/summary.md"
echo
echo "summary and logs in $OUT_DIR"
