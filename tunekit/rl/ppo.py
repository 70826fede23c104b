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

The math is in small pure functions in tunekit.rl.ppo_math (pinned against hand-computed values in
tests/test_ppo.py).
"""

from __future__ import annotations

import contextlib
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

from tunekit.rl.ppo_math import (
    AdaptiveKLController,
    entropy,
    gae,
    kl_penalized_rewards,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from tunekit.rl.rollout import in_chunks, last_logits, position_ids, reference_of, response_logprobs

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


def forward_responses(model: Any, batch_ids: torch.Tensor, mask: torch.Tensor, context: int, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tempered logits and values at the positions that predict the response tokens, and the
    response tokens' log-probs."""
    responses = batch_ids.shape[1] - context
    logits, values = model(batch_ids, mask, keep=responses + 1)
    logits = last_logits(logits, responses).float() / max(temperature, 1e-6)
    return logits, values[:, context - 1 : -1], response_logprobs(logits, batch_ids[:, context:], 1.0)


def rollout_forward(model: Any, samples: Any, temperature: float, forward_batch_size: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values, log-probs and per-token entropies of the sampled responses under the policy with its
    value head, without gradients, `forward_batch_size` rows per forward pass."""
    parts = []
    with torch.no_grad():
        for rows in in_chunks(forward_batch_size, len(samples.responses)):
            logits, values, logprobs = forward_responses(model, samples.query_responses[rows],
                                                         samples.attention_mask[rows], samples.context, temperature)
            parts.append((values, logprobs, entropy(logits)))
    values, logprobs, entropies = (torch.cat(part) for part in zip(*parts))
    return values, logprobs, entropies


def ppo_loss(model: Any, mini: Batch, settings: Any, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + vf_coef * clipped value loss of a minibatch (or a forward batch of one)."""
    _, values, logprobs = forward_responses(model, mini.query_responses, mini.attention_mask, mini.context, temperature)
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


@dataclass
class OptimizerSettings:
    """AdamW and its learning-rate schedule, from the recipe's `train:` section."""

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: str = "constant"  # train.lr_scheduler_type
    warmup_steps: float = 0  # train.warmup_steps: optimizer steps, or a fraction of them below 1


def trackers(report_to: str | list[str] | None) -> str | list[str] | None:
    """train.report_to as accelerate's log_with (TensorBoard, W&B, ...); None for "none"."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n != "none"]
    return names or None


class PPOTrainer:
    """PPO with a KL penalty against a frozen reference, on accelerate.

    `settings` is the recipe's `ppo:` section, `generation` its `generation:` section; `reference` is
    a frozen copy of the starting policy, or None with a PEFT policy (the adapter is switched off
    instead). Each process samples and scores its own prompts; logged statistics are averaged over
    processes."""

    def __init__(self, policy: Any, tokenizer: Any, reward: Any, prompts: list[Any], settings: Any, generation: Any,
                 optimizer: OptimizerSettings, seed: int = 42, logging_steps: int = 10, log: Any = None,
                 reference: Any = None, shown_samples: int = 3, mixed_precision: str = "no",
                 save_steps: int | None = None, checkpoints: Any = None, cpu: bool = False,
                 report_to: str | list[str] | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from tunekit.errors import TrainingFailure
        from tunekit.launch import check_world_size

        # cpu=True without CUDA: what makes several CPU processes join one gloo group (and
        # train.use_cpu keeps a run on the CPU of a GPU machine). An Accelerator made earlier in the
        # same process (another run) must not decide the device: TrainingArguments resets it too.
        AcceleratorState._reset_state(reset_partial_state=True)
        log_with = trackers(report_to) if checkpoints else None
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu or not torch.cuda.is_available(),
                                       log_with=log_with, project_dir=checkpoints.path / "runs" if log_with else None)
        problem = check_world_size(self.accelerator.num_processes)
        if problem:
            raise TrainingFailure(problem)
        if log_with:
            self.accelerator.init_trackers("ppo")
        torch.manual_seed(seed + self.accelerator.process_index)  # each process samples differently
        model = PolicyWithValue(policy)
        # Dropout off (eval mode) throughout: the rollout's log-probs and the update's must agree.
        model.eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW(trainable, lr=optimizer.lr, weight_decay=optimizer.weight_decay,
                                  betas=optimizer.betas, eps=optimizer.eps)
        self.model, self.optimizer = self.accelerator.prepare(model, adamw)
        self.scheduler = learning_rate_schedule(self.optimizer, optimizer, settings)
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
        from tunekit.faults import inject_fault
        from tunekit.progress import GracefulStop, Progress
        from tunekit.training import interrupted

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
            for tracker in self.accelerator.trackers:  # not end_training(): it ends the process group
                tracker.finish()

    def ppo_step(self, prompts: list[Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Roll out, score, update; the step's statistics (averaged over processes) and samples."""
        batch, stats, shown = self.rollout(prompts)
        stats.update(minibatch_epochs(self.model, self.optimizer, self.accelerator, batch, self.settings,
                                      self.generation.temperature, self.seed + self.step, self.scheduler))
        stats = self.reduce(stats)
        # Every process moves its coefficient with the same all-process mean KL, so all stay equal.
        self.kl.update(stats["kl"], self.settings.rollout_batch_size * self.accelerator.num_processes)
        return stats, shown

    def log_window(self, window: list[dict[str, float]], shown: list[dict[str, Any]], progress: Any) -> None:
        """One metrics.jsonl record (and tracker entry): the means over the steps since the last one."""
        record = {key: sum(w[key] for w in window) / len(window) for key in window[0]}
        record.update(kl_coef=self.kl.value, learning_rate=self.scheduler.get_last_lr()[0])
        self.log({"step": self.step, **record, "elapsed_s": round(time.time() - self.started, 1), "samples": shown})
        self.accelerator.log(record, step=self.step)
        if progress:
            progress.note(record.get("reward"), "reward")
            progress.report()

    def save_checkpoint(self, folder: Path) -> None:
        """Policy and value head (safetensors), optimizer, schedule, step, KL coefficient, and each
        process's RNG states, written to a temporary folder and renamed into place, then marked complete."""
        from safetensors.torch import save_model

        from tunekit.faults import inject_fault
        from tunekit.files import write_json

        tmp = folder.with_name(f".{folder.name}.tmp")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        torch.save(self.rank_state(), tmp / f"rank-{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_model(self.accelerator.unwrap_model(self.model), str(tmp / "model.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "kl_coef": self.kl.value}, tmp / "ppo_state.pt")
            write_json(tmp / "trainer_state.json", {"global_step": self.step})
            os.replace(tmp, folder)
            inject_fault("kill-before-mark", self.step)
            self.checkpoints.mark_checkpoint(folder)
            for older in folder.parent.glob("checkpoint-*"):  # keep the newest complete one only
                if older != folder:
                    shutil.rmtree(older, ignore_errors=True)
            inject_fault("kill-after-save", self.step)

    def rank_state(self) -> dict[str, Any]:
        """What differs between processes: the RNG states (each samples its own responses), and
        the KL coefficient (equal on all; kept to show it)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"cpu_rng": torch.get_rng_state(), "cuda_rng": cuda, "python_rng": random.getstate(),
                "kl_coef": self.kl.value}

    def load_checkpoint(self, folder: Path) -> None:
        """Continue from a checkpoint written by save_checkpoint (tensors and plain values only:
        loaded with weights_only, so no arbitrary pickle runs)."""
        from safetensors.torch import load_model

        from tunekit.errors import UserError

        mine = folder / f"rank-{self.accelerator.process_index}.pt"
        if not mine.is_file():
            raise UserError(f"--resume {folder}: no state for process {self.accelerator.process_index}; resume with "
                            "the number of processes that wrote the checkpoint")
        load_model(self.accelerator.unwrap_model(self.model), str(folder / "model.safetensors"))
        state = torch.load(folder / "ppo_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl.value = state["kl_coef"]
        rank = torch.load(mine, weights_only=True)
        torch.set_rng_state(rank["cpu_rng"])
        if rank["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank["cuda_rng"])
        random.setstate(rank["python_rng"])
        self.step = int(json.loads((folder / "trainer_state.json").read_text())["global_step"])

    def rollout(self, prompts: list[Any]) -> tuple[Batch, dict[str, float], list[dict[str, Any]]]:
        """Generate, score, and turn the scores into whitened per-token advantages. Sampling and the
        reference run under the prepared model's autocast (bf16 on a GPU): one precision for every
        log-prob, so the sampled distribution is the measured one and the KL starts at 0."""
        from tunekit.rl.rewards import component_means
        from tunekit.rl.rollout import lm_logprobs, sample, scores_of

        settings, temperature = self.settings, self.generation.temperature
        with self.accelerator.autocast():
            samples = sample(self.policy, self.tokenizer, [p.policy_text for p in prompts], self.generation)
        raw, scores = scores_of(self.reward, prompts, samples, settings.missing_eos_penalty)
        mask = samples.response_mask.float()
        values, logprobs, entropies = rollout_forward(self.model, samples, temperature, settings.forward_batch_size)
        with self.accelerator.autocast(), reference_of(self.policy, self.reference) as reference:
            ref_logprobs = lm_logprobs(reference, samples, temperature, settings.forward_batch_size)
        rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, self.kl.value)
        values = values * mask
        advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
        if settings.whiten_advantages:
            advantages = whiten(advantages, mask)
        batch = Batch(samples.query_responses, samples.attention_mask, samples.responses, mask, logprobs, values,
                      advantages, returns)
        stats = {"reward": float(raw.mean()), "score": float(scores.mean()), "kl": float(kl.sum(1).mean()),
                 "entropy": float(masked_mean(entropies, mask)), "response_length": float(mask.sum(1).mean()),
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


def learning_rate_schedule(optimizer: Any, settings: OptimizerSettings, ppo: Any) -> Any:
    """train.lr_scheduler_type over all of PPO's optimizer steps (steps x epochs x minibatches)."""
    from transformers import get_scheduler

    total = ppo.steps * ppo.epochs * -(-ppo.rollout_batch_size // ppo.minibatch_size)
    warmup = int(settings.warmup_steps * total) if settings.warmup_steps < 1 else int(settings.warmup_steps)
    return get_scheduler(settings.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
