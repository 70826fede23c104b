# The InstructGPT-style pipeline as file targets: `make -f examples/pipeline.mk` runs what is out
# of date and nothing else. Each step's target is its run folder's README.md (the model card), the
# last file a successful run writes, so a failed or interrupted step is redone on the next `make`.
#
#   make -f examples/pipeline.mk TUNEKIT=".venv/bin/tunekit"        # the whole chain
#   make -f examples/pipeline.mk runs/sft-tiny-gpt-alpaca/README.md  # up to SFT only
#
# Copy this file next to your own recipes and edit the four steps.
TUNEKIT ?= tunekit
RUNS    ?= runs

PRETRAIN := $(RUNS)/pretrain-tiny-gpt-shakespeare
SFT      := $(RUNS)/sft-tiny-gpt-alpaca
REWARD   := $(RUNS)/reward-minilm-sst2-sentiment
RLHF     := $(RUNS)/rlhf-tiny-gpt-sentiment-ppo

.PHONY: all summary
all: $(RLHF)/README.md summary

$(PRETRAIN)/README.md: recipes/pretrain/tiny-gpt-shakespeare.yaml
	$(TUNEKIT) pretrain $< --output-dir $(PRETRAIN) --overwrite

$(SFT)/README.md: recipes/sft/tiny-gpt-alpaca.yaml $(PRETRAIN)/README.md
	$(TUNEKIT) sft $< --set model.name=$(PRETRAIN)/model --output-dir $(SFT) --overwrite

$(REWARD)/README.md: recipes/reward/minilm-sst2-sentiment.yaml
	$(TUNEKIT) reward $< --output-dir $(REWARD) --overwrite

$(RLHF)/README.md: recipes/rlhf/tiny-gpt-sentiment-ppo.yaml $(SFT)/README.md $(REWARD)/README.md
	$(TUNEKIT) rlhf $< --set model.name=$(SFT)/model --set rlhf.reward_model=$(REWARD) --output-dir $(RLHF) --overwrite

summary:
	@$(TUNEKIT) runs $(RUNS)
