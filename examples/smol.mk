# The real-model chain: SmolLM2-135M-Instruct (`tunekit model fetch`), its exact-answer accuracy on
# tunekit's arithmetic problems (easy and hard) before and after LoRA SFT on both, GRPO (and PPO:
# `make -f examples/smol.mk runs/smol-eval/ppo.json`) on the hard ones from the SFT model, a
# merge, and `tunekit serve` of the merged model answering the official `openai` client. Each
# training step's target is its run folder's README.md (the model card, written last), each
# evaluation's a JSON file under $(RUNS)/smol-eval/; every step runs under /usr/bin/time -v (user +
# system CPU seconds and peak memory land in $(RUNS)/smol-time/STEP.txt).
#
#   make smol                                        # the whole chain (see the README's table)
#   make -f examples/smol.mk runs/smol-eval/grpo-seed1.json   # GRPO again with train.seed=1 (the recipe's is 42)
#   make -f examples/smol.mk summary                 # the table, from the files the chain wrote
TUNEKIT ?= tunekit
PYTHON  ?= python3
RUNS    ?= runs
MODEL   ?= models/smollm2-135m-instruct
TIME    := $(RUNS)/smol-time
EVAL    := $(RUNS)/smol-eval
TIMED    = mkdir -p $(TIME) && /usr/bin/time -v -o $(TIME)/$(1).txt

SFT     := $(RUNS)/lora-smollm2-arith
GRPO    := $(RUNS)/lora-smollm2-arith-grpo
PPO     := $(RUNS)/lora-smollm2-arith-ppo
EASY    := recipes/eval/arith-exact.yaml recipes/eval/arith-exact-sampled.yaml
HARD    := recipes/eval/arith-hard-exact.yaml recipes/eval/arith-hard-exact-sampled.yaml

.PHONY: all summary serve-check
all: $(EVAL)/grpo.json serve-check summary

$(MODEL)/config.json:
	$(TUNEKIT) model fetch smollm2-135m-instruct

data/arith/train.jsonl: tunekit/arithmetic.py
	$(PYTHON) -m tunekit.arithmetic data/arith

data/arith-hard/train.jsonl: tunekit/arithmetic.py
	$(PYTHON) -m tunekit.arithmetic data/arith-hard --difficulty hard

$(EVAL)/base.json: $(MODEL)/config.json data/arith/train.jsonl data/arith-hard/train.jsonl
	$(call TIMED,eval-base) $(TUNEKIT) eval $(MODEL) $(foreach t,$(EASY) $(HARD),--task $(t)) --out $@

$(SFT)/README.md: recipes/sft/smollm2-arith.yaml $(MODEL)/config.json data/arith/train.jsonl data/arith-hard/train.jsonl
	$(call TIMED,sft) $(TUNEKIT) lora $< --output-dir $(SFT) --overwrite

$(SFT)/merged/config.json: $(SFT)/README.md
	$(TUNEKIT) merge $(SFT)

$(EVAL)/sft.json: $(SFT)/merged/config.json data/arith-hard/train.jsonl
	$(call TIMED,eval-sft) $(TUNEKIT) eval $(SFT)/merged $(foreach t,$(EASY) $(HARD),--task $(t)) --out $@

$(GRPO)/README.md: recipes/rlhf/smollm2-arith-grpo.yaml $(SFT)/merged/config.json data/arith-hard/train.jsonl
	$(call TIMED,grpo) $(TUNEKIT) lora $< --set model.name=$(SFT)/merged --output-dir $(GRPO) --overwrite

$(PPO)/README.md: recipes/rlhf/smollm2-arith-ppo.yaml $(SFT)/merged/config.json data/arith-hard/train.jsonl
	$(call TIMED,ppo) $(TUNEKIT) lora $< --set model.name=$(SFT)/merged --output-dir $(PPO) --overwrite

$(GRPO)/merged/config.json: $(GRPO)/README.md
	$(TUNEKIT) merge $(GRPO)

$(EVAL)/grpo.json: $(GRPO)/merged/config.json $(EVAL)/base.json $(EVAL)/sft.json
	$(call TIMED,eval-grpo) $(TUNEKIT) eval $(GRPO)/merged $(foreach t,$(HARD),--task $(t)) --out $@

$(EVAL)/ppo.json: $(PPO)/README.md
	$(TUNEKIT) merge $(PPO)
	$(call TIMED,eval-ppo) $(TUNEKIT) eval $(PPO)/merged $(foreach t,$(HARD),--task $(t)) --out $@

# The same GRPO step with another seed, merged and evaluated like grpo.json: the table adds a row per
# seed and their mean and spread.
$(EVAL)/grpo-seed%.json: recipes/rlhf/smollm2-arith-grpo.yaml $(SFT)/merged/config.json data/arith-hard/train.jsonl
	$(call TIMED,grpo-seed$*) $(TUNEKIT) lora $< --set model.name=$(SFT)/merged --set train.seed=$* --output-dir $(GRPO)-seed$* --overwrite
	$(TUNEKIT) merge $(GRPO)-seed$*
	$(call TIMED,eval-grpo-seed$*) $(TUNEKIT) eval $(GRPO)-seed$*/merged $(foreach t,$(HARD),--task $(t)) --out $@

serve-check: $(GRPO)/merged/config.json
	$(PYTHON) examples/ask_openai.py $(GRPO)/merged "A farmer has 48 apples and sells 19. How many are left?"

summary:
	@$(PYTHON) -m tunekit.arith_table $(RUNS)
