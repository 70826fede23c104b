# tunekit: set-up is `make install` then `make test`; `make demo` runs the main job offline.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint demo bench clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: on a machine without CUDA this is the CPU wheel, and nothing later may
	# replace it with a multi-GB CUDA build.
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]" "torch==2.13.0"

test:
	$(BIN)/python -m pytest -q tests

lint:
	$(BIN)/ruff check tunekit tests bench

clean:
	rm -rf runs .pytest_cache

demo:
	$(BIN)/tunekit classify recipes/classify/minilm-sst2.yaml --overwrite

bench:
	$(BIN)/python bench/classify.py
