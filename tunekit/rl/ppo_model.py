"""What one PPO update is made of: the policy with its value head, a rollout batch, the forward
passes that score responses, the clipped losses and the minibatch epochs (tunekit.rl.ppo runs them)."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunekit.rl.ppo_math import policy_loss, value_loss
from tunekit.rl.rollout import in_chunks, response_scores

# ---------------------------------------------------------------------------------------------
# The model: policy + value head


class PolicyWithValue(nn.Module):
    """A causal LM (or a PeftModel around one) and a linear value head on its last hidden state.

    It stays in eval mode (no dropout: the rollout's log-probs and the update's must agree). With
    `checkpointing`, its decoder layers are checkpointed in passes with gradients all the same:
    transformers checkpoints a layer only in training mode, so for the length of such a pass the
    layers alone (not the attention, MLP or dropout modules inside them) say they are training."""

    def __init__(self, policy: nn.Module, checkpointing: bool = False) -> None:
        super().__init__()
        self.policy = policy
        hidden = policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no made-up baseline at step 0
        nn.init.zeros_(self.value_head.bias)
        self.layers: list[nn.Module] = []
        if checkpointing:
            from transformers.modeling_layers import GradientCheckpointingLayer

            base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            self.layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context: int, temperature: float,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(log-probs, entropies or None, values) of the response tokens after `context`
        (tunekit.rl.rollout.response_scores)."""
        checkpointed = self.layers if torch.is_grad_enabled() else []
        for layer in checkpointed:
            layer.training = True
        try:
            logprobs, entropies, values = response_scores(self.policy, input_ids, attention_mask, context, temperature,
                                                          with_entropy, self.value_head)
        finally:
            for layer in checkpointed:
                layer.training = False
        return logprobs, entropies, values


# ---------------------------------------------------------------------------------------------
# The update


@dataclass
class Batch:
    """One rollout batch after scoring: tensors over the query + response tokens."""

    query_responses: torch.Tensor  # (B, Q + R) left-padded query, right-padded response
    attention_mask: torch.Tensor  # (B, Q + R)
    responses: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    logprobs: torch.Tensor  # (B, R) under the rollout policy
    values: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)

    def rows(self, index: list[int] | slice) -> Batch:
        return Batch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @property
    def context(self) -> int:
        return self.query_responses.shape[1] - self.responses.shape[1]

    def without_padding(self) -> Batch:
        """The same rows without the columns that are padding in all of them: left of the longest
        query and right of the longest response. The rollout batch is padded to its longest prompt
        and response; a few of its rows in a forward pass then cost only what they hold. The result
        is the same: masked keys add nothing to attention, positions come from the attention mask,
        and a causal model's earlier positions do not see later columns."""
        # the response's first column is never padding; one query column stays to predict it from
        first = min(int(self.attention_mask.any(dim=0).float().argmax()), max(self.context - 1, 0))
        length = int(self.response_mask.any(dim=0).sum())  # 1 from a response's start up to its end
        full = slice(first, self.context + length)
        return Batch(self.query_responses[:, full], self.attention_mask[:, full],
                     *(getattr(self, f)[:, :length] for f in list(self.__dataclass_fields__)[2:]))


def rollout_forward(model: Any, samples: Any, temperature: float, forward_batch_size: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values, log-probs and per-token entropies of the sampled responses under the policy with its
    value head, without gradients, `forward_batch_size` rows per forward pass."""
    parts = []
    with torch.no_grad():
        for rows in in_chunks(forward_batch_size, len(samples.responses)):
            logprobs, entropies, values = model(samples.query_responses[rows], samples.attention_mask[rows],
                                                samples.context, temperature, with_entropy=True)
            parts.append((values, logprobs, entropies))
    values, logprobs, entropies = (torch.cat(part) for part in zip(*parts))
    return values, logprobs, entropies


def ppo_loss(model: Any, mini: Batch, settings: Any, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + vf_coef * clipped value loss of a minibatch (or a forward batch of one)."""
    logprobs, _, values = model(mini.query_responses, mini.attention_mask, mini.context, temperature)
    pg, clip_fraction, approx_kl = policy_loss(logprobs, mini.logprobs, mini.advantages, mini.response_mask,
                                               settings.clip_range)
    vf, vf_clip = value_loss(values, mini.values, mini.returns, mini.response_mask, settings.value_clip_range)
    loss = pg + settings.vf_coef * vf
    return loss, {"loss": loss, "policy_loss": pg, "value_loss": vf, "clip_fraction": clip_fraction,
                  "value_clip_fraction": vf_clip, "approx_kl": approx_kl}


def minibatch_epochs(model: Any, optimizer: Any, accelerator: Any, batch: Batch, settings: Any, temperature: float,
                     seed: int, scheduler: Any = None) -> dict[str, float]:
    """PPO's inner loop: `settings.epochs` passes over the batch in shuffled minibatches, one
    optimizer step each. A minibatch goes through the model `settings.forward_batch_size` rows at a
    time, gradients accumulated: each forward batch's loss is weighted by its share of the
    minibatch's response tokens, so the step is the one of the whole minibatch at once. Each forward
    batch leaves out the columns that are padding in all its rows (Batch.without_padding)."""
    order = list(range(len(batch.responses)))
    totals: dict[str, float] = {}
    updates = 0
    rng = random.Random(seed)
    for _ in range(settings.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), settings.minibatch_size):
            mini = batch.rows(order[start : start + settings.minibatch_size])
            tokens = mini.response_mask.sum().clamp(min=1)
            chunks = in_chunks(settings.forward_batch_size, len(mini.responses))
            for number, rows in enumerate(chunks):
                part = mini.rows(rows).without_padding()
                weight = part.response_mask.sum() / tokens
                loss, stats = ppo_loss(model, part, settings, temperature)
                # DDP: gradients are all-reduced once, with the minibatch's last backward
                syncing = contextlib.nullcontext() if number == len(chunks) - 1 else accelerator.no_sync(model)
                with syncing:
                    accelerator.backward(loss * weight)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach() * weight)
            if settings.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
            updates += 1
    return {key: value / max(updates, 1) for key, value in totals.items()}
