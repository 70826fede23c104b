"""Workarounds for upstream behaviour, walled off here, each with the version it was checked against."""

from __future__ import annotations

from typing import Any

from transformers import Trainer
from trl import SFTTrainer


class LeanSFTTrainer(SFTTrainer):
    """SFTTrainer whose training step is Trainer's: the loss from the model, nothing else.

    TRL 1.16's `SFTTrainer.compute_loss` also computes per-token entropy and top-1 accuracy over
    the full logits on every step, for its logs; on a CPU that costs about a quarter of the step
    time (measured in bench/sft.py). tunekit builds its own labels (tunekit.masking), so the
    model's own loss is the SFT loss, averaged over the trained tokens of the whole batch.
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # Padding-free packed rows are kept apart (block-diagonal attention from position_ids) only
        # when the model builds no KV cache; TRL sets the same flag in its own compute_loss.
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
