# The InstructGPT chain on the real model, with a check for reward hacking: two MiniLM sentiment
# reward models trained on disjoint halves of the SST-2 training sentences (the proxy that PPO
# trains against, and the judge it never sees), then PPO of SmolLM2-135M-Instruct (LoRA) against
# the proxy at three KL coefficients, then the table of proxy, judge, KL and the judge's win rate
# (tunekit.judge_table). Each step's target is its run folder's README.md (written last), and each
# runs under /usr/bin/time -v (CPU seconds and peak memory in $(RUNS)/rlhf-real-time/STEP.txt).
#
#   make rlhf-real                                   # the whole chain
#   make -f examples/rlhf-real.mk summary            # the table, from the files the chain wrote
TUNEKIT ?= tunekit
PYTHON  ?= python3
RUNS    ?= runs
MODEL   ?= models/smollm2-135m-instruct
KL      ?= 0.01 0.05 0.2
TIME    := $(RUNS)/rlhf-real-time
TIMED    = mkdir -p $(TIME) && /usr/bin/time -v -o $(TIME)/$(1).txt

PROXY   := $(RUNS)/reward-minilm-sst2-proxy
JUDGE   := $(RUNS)/reward-minilm-sst2-judge
PPO     := $(RUNS)/lora-smollm2-sentiment-ppo-kl
RECIPE  := recipes/rlhf/smollm2-sentiment-ppo.yaml

.PHONY: all summary
all: $(foreach k,$(KL),$(PPO)$(k)/README.md) summary

$(MODEL)/config.json:
	$(TUNEKIT) model fetch smollm2-135m-instruct

$(PROXY)/README.md: recipes/reward/minilm-sst2-proxy.yaml
	$(call TIMED,proxy) $(TUNEKIT) reward $< --output-dir $(PROXY) --overwrite

$(JUDGE)/README.md: recipes/reward/minilm-sst2-judge.yaml
	$(call TIMED,judge) $(TUNEKIT) reward $< --output-dir $(JUDGE) --overwrite

$(PPO)%/README.md: $(RECIPE) $(MODEL)/config.json $(PROXY)/README.md $(JUDGE)/README.md
	$(call TIMED,ppo-kl$*) $(TUNEKIT) lora $< --set ppo.kl_coef=$* --set model.name=$(MODEL) \
		--set rlhf.reward_model=$(PROXY) --set rlhf.judge=$(JUDGE) --output-dir $(PPO)$* --overwrite

summary:
	@$(PYTHON) -m tunekit.judge_table $(foreach k,$(KL),$(PPO)$(k))
