"""The file names of a run folder, spelled once: ``fit`` writes them, resume, prediction, MLflow
logging and the experiments read them. An experiment folder keeps its one split under ``SPLIT_NAME``
too."""

CHECKPOINT_NAME = "checkpoint_last.pt"  # engine/checkpoint.py says what it holds
CONFIG_NAME = "config.yaml"  # the resolved config; `cellseg train --resume` reads it back
METRICS_NAME = "metrics.json"  # the history, one record per epoch
SPLIT_NAME = "split.json"  # the stacks trained and validated on
