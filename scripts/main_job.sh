#!/usr/bin/env bash
# Main job (`make run`): synthesise a small hyper-labeled dataset, ingest it into a Zarr store, train
# a small model on the CPU (quick profile, a few minutes), register it in MLflow, segment a stack
# with the registered model, and say how to look at everything. Work folder: $CELLSEG_WORK
# (default outputs/main_job); its MLflow store (mlflow.db) keeps every run and model version.
set -euo pipefail

WORK=${CELLSEG_WORK:-outputs/main_job}
MODEL_NAME=${CELLSEG_MODEL_NAME:-cellseg-main-job}
EPOCHS=${CELLSEG_EPOCHS:-6}
mkdir -p "$WORK"
cd "$WORK"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db"

if ! cellseg predict --help >/dev/null 2>&1; then
  echo "error: 'cellseg predict' is not available in this install; the main job needs it" >&2
  exit 1
fi

echo "== 1/4 synthesise a small trainer-layout dataset (seeded: same bytes every time)"
rm -rf data predictions
cellseg data synth data/trainer --layout trainer --cells 32 --negatives 12 --size 128 --seed 0

echo "== 2/4 ingest it into a Zarr store"
cellseg data ingest data/trainer --out data/trainer.zarr --layout trainer

echo "== 3/4 train on the CPU (quick profile), log to MLflow, register as $MODEL_NAME"
RUN_DIR="runs/$(date +%Y%m%d-%H%M%S)"
cellseg train --data data/trainer.zarr --profile quick --strategy fluorescence --epochs "$EPOCHS" \
  --device cpu --run-dir "$RUN_DIR" --experiment main-job --register-as "$MODEL_NAME"

echo "== 4/4 segment a stack with the registered model"
SAMPLE=$(find data/trainer/FullImage -name '*.tif' | sort | head -n 1)
cellseg predict "models:/$MODEL_NAME@challenger" "$SAMPLE" --out predictions --device cpu

cat <<DONE

Done. Everything is in $PWD:
  run folder        $RUN_DIR (config.yaml, split.json, checkpoint_last.pt, metrics.json)
  prediction        predictions/masks/ and predictions/overlays/
  registered model  models:/$MODEL_NAME@challenger (this run), @champion (the one in use)
Look at runs, metrics, plots and model versions in the MLflow UI:
  cd $PWD && cellseg ui        # then open http://127.0.0.1:5000
Continue or extend this run:   cellseg train --run-dir $RUN_DIR --resume --epochs 12
DONE
