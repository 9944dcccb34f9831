# Two entry points for a newcomer: `make run` (main job) and `make test` (test suite).
# Both create .venv and install everything they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the releases this lab's machines carry on disk (CPU or CUDA).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install run test bench clean

$(BIN)/cellseg: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/cellseg ## create .venv with cellseg and its dependencies

run: install ## main job: synthesise a small dataset, ingest it, train, register, predict
	PATH=$(abspath $(BIN)):$$PATH bash scripts/main_job.sh

test: install ## the whole test suite (CPU)
	bash scripts/ensure_services.sh
	$(BIN)/python -m pytest -n 2 -q

bench: install ## benchmarks (prints markdown tables)
	$(BIN)/python benchmarks/data_loading.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/predict.py

clean:
	rm -rf $(VENV) build *.egg-info
