"""PPO for language models (InstructGPT's step 3), on accelerate: tunekit's own, since TRL deleted its
PPOTrainer in 1.13.

One PPO step:
  1. rollout: sample a batch of prompts, let the policy generate (tunekit.rl.rollout);
  2. score: the reward model scores each prompt + response (minus a penalty for one that never ends);
  3. per-token rewards: -kl_coef * (log pi(y_t) - log pi_ref(y_t)) on every response token, plus the
     score on the last one (InstructGPT's KL penalty keeps the policy near the SFT model);
  4. GAE advantages (gamma, lam) from the value head's estimates, whitened over the batch;
  5. several epochs of shuffled minibatch updates: clipped policy loss + vf_coef * clipped value
     loss, gradient clipping;
  6. the KL coefficient adapts towards a target KL (Ziegler et al. 2019), when one is set.

The value head is a linear layer on the policy's last hidden state (a shared trunk, as in InstructGPT's
descendants in TRL <= 0.11), not a separate critic initialised from the reward model: it costs one
extra vector-sized layer instead of a second network, and with LoRA the reference policy is the same
network with its adapter switched off, so PPO holds one language model in memory, plus the reward model.

The math is in small pure functions (pinned against hand-computed values in tests/test_ppo.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# The math


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the entries where mask is 1."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the entries where mask is 1 (as numpy's var(ddof=1))."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalized_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (-kl_coef * KL on each response token, the score added on the last one) and
    the per-token KL estimate log pi - log pi_ref (the k1 estimator InstructGPT uses)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; (advantages, returns).

    Padding after a response's end has reward 0 and value 0, so the last real token's next value is 0
    (the episode ends there) and padding contributes nothing."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss; (loss, clip fraction, approximate KL to the rollout policy)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2); (loss, clip fraction)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask)


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient towards `target` KL per sequence, by at most 20%
    of the error per `horizon` samples. With target None the coefficient stays fixed."""

    def __init__(self, value: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


# ---------------------------------------------------------------------------------------------
# The model: policy + value head


class PolicyWithValue(nn.Module):
    """A causal LM (or a PeftModel around one) and a linear value head on its last hidden state."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        hidden = policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no made-up baseline at step 0
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, values); with `keep` > 0 the logits of the last `keep` positions only (see
        last_logits), the values of every position."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                          output_hidden_states=True, use_cache=False, logits_to_keep=keep)
        hidden = out.hidden_states[-1].to(self.value_head.weight.dtype)
        return out.logits, self.value_head(hidden).squeeze(-1)


def last_logits(logits: torch.Tensor, responses: int) -> torch.Tensor:
    """The logits that predict the `responses` last tokens, from a forward pass given
    logits_to_keep=responses + 1. The LM head then runs on those positions only, not on the
    (left-padded) query: with a large vocabulary it is a large part of a forward pass, and its
    [batch, positions, vocabulary] output the largest tensor. Counted from the end, so a model that
    ignores logits_to_keep (returns every position) gives the same result."""
    return logits[:, -(responses + 1) : -1]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them (so log-probs match the sampling)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(y_t) of each response token under the tempered distribution it was sampled from;
    `logits` are those of the positions that predict the response tokens."""
    logits = logits / max(temperature, 1e-6)
    return torch.gather(logits.log_softmax(-1), 2, responses.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax over `logits`."""
    probs = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


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

    def rows(self, index: list[int]) -> Batch:
        return Batch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def forward_responses(model: Any, batch_ids: torch.Tensor, mask: torch.Tensor, context: int, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tempered logits and values at the positions that predict the response tokens, and the
    response tokens' log-probs."""
    responses = batch_ids.shape[1] - context
    logits, values = model(batch_ids, mask, keep=responses + 1)
    logits = last_logits(logits, responses) / max(temperature, 1e-6)
    return logits, values[:, context - 1 : -1], response_logprobs(logits, batch_ids[:, context:], 1.0)


def minibatch_epochs(model: Any, optimizer: Any, accelerator: Any, batch: Batch, settings: Any, temperature: float,
                     seed: int) -> dict[str, float]:
    """PPO's inner loop: `settings.epochs` passes over the batch in shuffled minibatches."""
    context = batch.query_responses.shape[1] - batch.responses.shape[1]
    order = list(range(len(batch.responses)))
    totals: dict[str, float] = {}
    updates = 0
    rng = random.Random(seed)
    for _ in range(settings.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), settings.minibatch_size):
            mini = batch.rows(order[start : start + settings.minibatch_size])
            _, values, logprobs = forward_responses(model, mini.query_responses, mini.attention_mask, context, temperature)
            pg, clip_fraction, approx_kl = policy_loss(logprobs, mini.logprobs, mini.advantages, mini.response_mask,
                                                       settings.clip_range)
            vf, vf_clip = value_loss(values, mini.values, mini.returns, mini.response_mask, settings.value_clip_range)
            loss = pg + settings.vf_coef * vf
            accelerator.backward(loss)
            if settings.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            stats = {"loss": loss, "policy_loss": pg, "value_loss": vf, "clip_fraction": clip_fraction,
                     "value_clip_fraction": vf_clip, "approx_kl": approx_kl}
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            updates += 1
    return {key: value / max(updates, 1) for key, value in totals.items()}


# ---------------------------------------------------------------------------------------------
# The trainer


def prompt_batches(count: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Any:
    """Endless batches of prompt indices: shuffled epochs, each rank its own slice of every batch."""
    rng, order = random.Random(seed), []
    while True:
        while len(order) < batch_size * world:
            epoch = list(range(count))
            rng.shuffle(epoch)
            order += epoch
        take, order = order[: batch_size * world], order[batch_size * world :]
        yield take[rank * batch_size : (rank + 1) * batch_size]


class PPOTrainer:
    """PPO with a KL penalty against a frozen reference, on accelerate.

    `settings` is the recipe's `ppo:` section, `generation` its `generation:` section; `reference` is
    a frozen copy of the starting policy, or None with a PEFT policy (the adapter is switched off
    instead). Each process samples and scores its own prompts; logged statistics are averaged over
    processes."""

    def __init__(self, policy: Any, tokenizer: Any, reward: Any, prompts: list[Any], settings: Any, generation: Any,
                 optimizer: dict[str, Any], seed: int = 42, logging_steps: int = 10, log: Any = None,
                 reference: Any = None, shown_samples: int = 3, mixed_precision: str = "no",
                 save_steps: int | None = None, checkpoints: Any = None, cpu: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from tunekit.errors import TrainingFailure
        from tunekit.launch import check_world_size

        # cpu=True without CUDA: what makes several CPU processes join one gloo group (and
        # train.use_cpu keeps a run on the CPU of a GPU machine). An Accelerator made earlier in the
        # same process (another run) must not decide the device: TrainingArguments resets it too.
        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu or not torch.cuda.is_available())
        problem = check_world_size(self.accelerator.num_processes)
        if problem:
            raise TrainingFailure(problem)
        torch.manual_seed(seed + self.accelerator.process_index)  # each process samples differently
        model = PolicyWithValue(policy)
        # Dropout off (eval mode) throughout: the rollout's log-probs and the update's must agree.
        model.eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer = self.accelerator.prepare(model, torch.optim.AdamW(trainable, **optimizer))
        self.reward = reward.to(self.accelerator.device)
        self.reference = reference.to(self.accelerator.device).eval() if reference is not None else None
        self.tokenizer, self.prompts, self.settings, self.generation = tokenizer, prompts, settings, generation
        self.kl = AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
        self.seed, self.logging_steps, self.log, self.shown = seed, logging_steps, log or (lambda record: None), shown_samples
        # `checkpoints` is the run folder (RunFolder): checkpoint-N/ go there and are marked complete.
        self.save_steps, self.checkpoints, self.step = save_steps, checkpoints, 0

    @property
    def policy(self) -> Any:
        return self.accelerator.unwrap_model(self.model).policy

    def train(self) -> None:
        """The PPO steps, with the progress display; on Ctrl-C the current step finishes, a
        checkpoint is saved and Interrupted is raised."""
        from tunekit.progress import GracefulStop, Progress
        from tunekit.training import inject_fault, interrupted

        batches = prompt_batches(len(self.prompts), self.settings.rollout_batch_size, self.seed,
                                 self.accelerator.process_index, self.accelerator.num_processes)
        for _ in range(self.step):  # resumed: the prompt batches already trained on
            next(batches)
        progress = None
        if self.accelerator.is_main_process:
            progress = Progress(self.settings.steps, self.settings.rollout_batch_size * self.accelerator.num_processes,
                                label="ppo")
            progress.start_at(self.step)
        window: list[dict[str, float]] = []
        self.started = time.time()
        try:
            with GracefulStop() as stop:
                for step in range(self.step + 1, self.settings.steps + 1):
                    self.step = step
                    stats, shown = self.ppo_step([self.prompts[i] for i in next(batches)])
                    window.append(stats)
                    last = step == self.settings.steps
                    if progress:
                        progress.update(step)
                    if step % self.logging_steps == 0 or last:
                        self.log_window(window, shown, progress)
                        window = []
                    inject_fault(f"interrupt-rank-{self.accelerator.process_index}", step)
                    stopping = stop.agreed(self.accelerator.device, self.accelerator.num_processes)
                    if self.checkpoints and not last and (stopping or (self.save_steps and step % self.save_steps == 0)):
                        self.save_checkpoint(self.checkpoints.path / f"checkpoint-{step}")
                    if stopping and not last:
                        raise interrupted(self.checkpoints, step)
        finally:
            if progress:
                progress.close()

    def ppo_step(self, prompts: list[Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Roll out, score, update; the step's statistics (averaged over processes) and samples."""
        batch, stats, shown = self.rollout(prompts)
        stats.update(minibatch_epochs(self.model, self.optimizer, self.accelerator, batch, self.settings,
                                      self.generation.temperature, self.seed + self.step))
        self.kl.update(stats["kl"], self.settings.rollout_batch_size * self.accelerator.num_processes)
        return self.reduce(stats), shown

    def log_window(self, window: list[dict[str, float]], shown: list[dict[str, Any]], progress: Any) -> None:
        """One metrics.jsonl record: the means over the steps since the last one."""
        record = {key: sum(w[key] for w in window) / len(window) for key in window[0]}
        self.log({"step": self.step, **record, "kl_coef": self.kl.value,
                  "elapsed_s": round(time.time() - self.started, 1), "samples": shown})
        if progress:
            progress.note(record.get("reward"), "reward")
            progress.report()

    def save_checkpoint(self, folder: Path) -> None:
        """Policy and value head (safetensors), optimizer, step, KL coefficient and RNG states,
        written to a temporary folder and renamed into place, then marked complete."""
        from safetensors.torch import save_model

        from tunekit.outputs import write_json
        from tunekit.training import inject_fault

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            tmp = folder.with_name(f".{folder.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(self.accelerator.unwrap_model(self.model), str(tmp / "model.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "kl_coef": self.kl.value,
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "ppo_state.pt")
            write_json(tmp / "trainer_state.json", {"global_step": self.step})
            os.replace(tmp, folder)
            inject_fault("kill-before-mark", self.step)
            self.checkpoints.mark_checkpoint(folder)
            for older in folder.parent.glob("checkpoint-*"):  # keep the newest complete one only
                if older != folder:
                    shutil.rmtree(older, ignore_errors=True)
            inject_fault("kill-after-save", self.step)

    def load_checkpoint(self, folder: Path) -> None:
        """Continue from a checkpoint written by save_checkpoint (tensors and plain values only:
        loaded with weights_only, so no arbitrary pickle runs)."""
        from safetensors.torch import load_model

        load_model(self.accelerator.unwrap_model(self.model), str(folder / "model.safetensors"))
        state = torch.load(folder / "ppo_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.value = state["kl_coef"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step = int(json.loads((folder / "trainer_state.json").read_text())["global_step"])

    def rollout(self, prompts: list[Any]) -> tuple[Batch, dict[str, float], list[dict[str, Any]]]:
        """Generate, score, and turn the scores into whitened per-token advantages."""
        from tunekit.rl.rewards import component_means
        from tunekit.rl.rollout import lm_logprobs, reference_of, sample, scores_of

        settings, temperature = self.settings, self.generation.temperature
        samples = sample(self.policy, self.tokenizer, [p.policy_text for p in prompts], self.generation)
        raw, scores = scores_of(self.reward, prompts, samples, settings.missing_eos_penalty)
        mask = samples.response_mask.float()
        with torch.no_grad():
            logits, values, logprobs = forward_responses(self.model, samples.query_responses, samples.attention_mask,
                                                         samples.context, temperature)
            token_entropy = masked_mean(entropy(logits), mask)
            with reference_of(self.policy, self.reference) as reference:
                ref_logprobs = lm_logprobs(reference, samples, temperature)
        rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, self.kl.value)
        values = values * mask
        advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
        if settings.whiten_advantages:
            advantages = whiten(advantages, mask)
        batch = Batch(samples.query_responses, samples.attention_mask, samples.responses, mask, logprobs, values,
                      advantages, returns)
        stats = {"reward": float(raw.mean()), "score": float(scores.mean()), "kl": float(kl.sum(1).mean()),
                 "entropy": float(token_entropy), "response_length": float(mask.sum(1).mean()),
                 "ended_fraction": float(samples.ended.float().mean()), "value": float(masked_mean(values, mask)),
                 **component_means(self.reward)}
        shown = [{"prompt": p.shown, "response": text, "reward": round(float(r), 4)}
                 for p, text, r in list(zip(prompts, samples.texts, raw))[: self.shown]]
        return batch, stats, shown

    def reduce(self, stats: dict[str, float]) -> dict[str, float]:
        """Statistics averaged over processes (each process scored its own rollouts)."""
        if self.accelerator.num_processes == 1:
            return stats
        values = torch.tensor(list(stats.values()), device=self.accelerator.device)
        return dict(zip(stats, self.accelerator.reduce(values, reduction="mean").tolist()))
