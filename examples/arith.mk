# The verifiable-reward chain: tunekit writes seeded arithmetic word problems, pre-trains the tiny
# GPT on worked problems, SFTs it on problem -> worked answer, then GRPO and PPO with the
# exact_answer reward (no reward model). Each step's target is its run folder's README.md (the model
# card, written last), so a failed step is redone on the next `make`. The SFT and RL steps run under
# /usr/bin/time -v (the report, with user and system CPU seconds, lands in $(RUNS)/tiny-time/STEP.txt;
# an RL step's is copied into its run folder's time.txt too). `tunekit eval` then scores the SFT, GRPO and PPO
# models on all 500 held-out problems, greedy and sampled ($(RUNS)/tiny-eval/*.json), and
# `python -m tunekit.arith_table` prints the README's table from those files.
#
#   make -f examples/arith.mk TUNEKIT=".venv/bin/tunekit" PYTHON=".venv/bin/python"
#   make -f examples/arith.mk summary      # held-out exact-answer accuracy before / after each RL run
TUNEKIT ?= tunekit
PYTHON  ?= python3
RUNS    ?= runs
DATA    ?= data/arith
TIME    ?= /usr/bin/time -v -o

PRETRAIN := $(RUNS)/pretrain-tiny-gpt-arith
SFT      := $(RUNS)/sft-tiny-gpt-arith
GRPO     := $(RUNS)/rlhf-tiny-gpt-arith-grpo
PPO      := $(RUNS)/rlhf-tiny-gpt-arith-ppo

TASKS    := --task recipes/eval/arith-exact.yaml --task recipes/eval/arith-exact-sampled.yaml

.PHONY: all summary
all: $(RUNS)/tiny-eval/grpo.json $(RUNS)/tiny-eval/ppo.json summary

$(DATA)/train.jsonl: tunekit/arithmetic.py
	$(PYTHON) -m tunekit.arithmetic $(DATA)

$(PRETRAIN)/README.md: recipes/pretrain/tiny-gpt-arith.yaml $(DATA)/train.jsonl
	$(TUNEKIT) pretrain $< --output-dir $(PRETRAIN) --overwrite

$(SFT)/README.md: recipes/sft/tiny-gpt-arith.yaml $(PRETRAIN)/README.md
	mkdir -p $(RUNS)/tiny-time
	$(TIME) $(RUNS)/tiny-time/sft.txt $(TUNEKIT) sft $< --set model.name=$(PRETRAIN)/model --output-dir $(SFT) --overwrite

$(GRPO)/README.md: recipes/rlhf/tiny-gpt-arith-grpo.yaml $(SFT)/README.md
	mkdir -p $(RUNS)/tiny-time
	$(TIME) $(RUNS)/tiny-time/grpo.txt $(TUNEKIT) rlhf $< --set model.name=$(SFT)/model --output-dir $(GRPO) --overwrite
	cp $(RUNS)/tiny-time/grpo.txt $(GRPO)/time.txt

$(PPO)/README.md: recipes/rlhf/tiny-gpt-arith-ppo.yaml $(SFT)/README.md
	mkdir -p $(RUNS)/tiny-time
	$(TIME) $(RUNS)/tiny-time/ppo.txt $(TUNEKIT) rlhf $< --set model.name=$(SFT)/model --output-dir $(PPO) --overwrite
	cp $(RUNS)/tiny-time/ppo.txt $(PPO)/time.txt

$(RUNS)/tiny-eval/sft.json: $(SFT)/README.md
	mkdir -p $(RUNS)/tiny-eval
	$(TUNEKIT) eval $(SFT) $(TASKS) --out $@

$(RUNS)/tiny-eval/%.json: $(RUNS)/rlhf-tiny-gpt-arith-%/README.md $(RUNS)/tiny-eval/sft.json
	$(TUNEKIT) eval $(RUNS)/rlhf-tiny-gpt-arith-$* $(TASKS) --out $@

summary:
	@$(PYTHON) -m tunekit.arith_table $(RUNS)
