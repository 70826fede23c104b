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
tests/test_ppo_math.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict

from tunekit.config import Section
from tunekit.jsontypes import JsonObject
from tunekit.rl.ppo_math import (
    AdaptiveKLController,
    gae,
    kl_penalized_rewards,
    masked_mean,
    whiten,
)
from tunekit.rl.ppo_model import Batch, PolicyWithValue, minibatch_epochs, rollout_forward
from tunekit.rl.rollout import reference_of

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


class PpoTraining(Section):
    """The `train:` keys tunekit's PPO reads, typed (`config.args` of an rlhf recipe); the `ppo:`
    section holds the rest. Defaults come from `train:` (tunekit.config.device_defaults and the
    rlhf method's own); these are only for keys nobody set."""

    model_config = ConfigDict(extra="ignore")  # the device defaults of other trainers are not PPO's business

    learning_rate: float
    seed: int
    logging_steps: int
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    bf16: bool = False
    fp16: bool = False
    # the policy's decoder layers recomputed in the update's backward pass instead of kept (PolicyWithValue)
    activation_checkpointing: bool = False
    save_steps: int | None = None
    use_cpu: bool = False
    report_to: str | list[str] | None = None
    # A PPO step is a fresh batch of the policy's own samples: a constant rate, unless the recipe
    # asks for a schedule (the Trainer methods' default is linear).
    lr_scheduler_type: str = "constant"
    warmup_steps: float = 0  # optimizer steps, or a fraction of them below 1

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"


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
                 train: PpoTraining, log: Any = None, reference: Any = None, shown_samples: int = 3,
                 checkpoints: Any = None, on_step: Any = None) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from tunekit.errors import TrainingFailure
        from tunekit.launch import check_world_size

        # cpu=True without CUDA: what makes several CPU processes join one gloo group (and
        # train.use_cpu keeps a run on the CPU of a GPU machine). An Accelerator made earlier in the
        # same process (another run) must not decide the device: TrainingArguments resets it too.
        AcceleratorState._reset_state(reset_partial_state=True)
        log_with = trackers(train.report_to) if checkpoints else None
        self.accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=train.use_cpu or not torch.cuda.is_available(),
                                       log_with=log_with, project_dir=checkpoints.path / "runs" if log_with else None)
        problem = check_world_size(self.accelerator.num_processes)
        if problem:
            raise TrainingFailure(problem)
        if log_with:
            self.accelerator.init_trackers("ppo")
        torch.manual_seed(train.seed + self.accelerator.process_index)  # each process samples differently
        model = PolicyWithValue(policy, train.activation_checkpointing)
        # Dropout off (eval mode) throughout: the rollout's log-probs and the update's must agree.
        model.eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay,
                                  betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
        self.model, self.optimizer = self.accelerator.prepare(model, adamw)
        self.scheduler = learning_rate_schedule(self.optimizer, train, settings)
        self.reward = reward.to(self.accelerator.device)
        self.reference = reference.to(self.accelerator.device).eval() if reference is not None else None
        self.tokenizer, self.prompts, self.settings, self.generation = tokenizer, prompts, settings, generation
        self.kl = AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
        self.seed, self.logging_steps, self.log, self.shown = train.seed, train.logging_steps, log or (lambda record: None), shown_samples
        # `checkpoints` is the run folder (RunFolder): checkpoint-N/ go there and are marked complete.
        self.save_steps, self.checkpoints, self.step = train.save_steps, checkpoints, 0
        # on_step(step, policy, reference) after each round: the judge's evaluation points (tunekit.rl.judge)
        self.on_step = on_step

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
                    if self.on_step:
                        self.on_step(step, self.policy, self.reference)
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

    def ppo_step(self, prompts: list[Any]) -> tuple[dict[str, float], list[JsonObject]]:
        """Roll out, score, update; the step's statistics (averaged over processes) and samples."""
        batch, stats, shown = self.rollout(prompts)
        stats.update(minibatch_epochs(self.model, self.optimizer, self.accelerator, batch, self.settings,
                                      self.generation.temperature, self.seed + self.step, self.scheduler))
        stats = self.reduce(stats)
        # Every process moves its coefficient with the same all-process mean KL, so all stay equal.
        self.kl.update(stats["kl"], self.settings.rollout_batch_size * self.accelerator.num_processes)
        return stats, shown

    def log_window(self, window: list[dict[str, float]], shown: list[JsonObject], progress: Any) -> None:
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

    def rank_state(self) -> JsonObject:
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

    def rollout(self, prompts: list[Any]) -> tuple[Batch, dict[str, float], list[JsonObject]]:
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


def learning_rate_schedule(optimizer: Any, settings: PpoTraining, ppo: Any) -> Any:
    """train.lr_scheduler_type over all of PPO's optimizer steps (steps x epochs x minibatches)."""
    from transformers import get_scheduler

    total = ppo.steps * ppo.epochs * -(-ppo.rollout_batch_size // ppo.minibatch_size)
    warmup = int(settings.warmup_steps * total) if settings.warmup_steps < 1 else int(settings.warmup_steps)
    return get_scheduler(settings.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total)
