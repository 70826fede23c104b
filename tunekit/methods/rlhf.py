"""`tunekit rlhf`: reinforcement learning from a reward model (InstructGPT's step 3), from reward
functions that check a response (verifiable rewards: `rlhf.reward_fn`, tunekit.rl.rewards), or a
weighted sum of both.

algo: ppo (default) runs tunekit's own PPO trainer (tunekit.rl.ppo: value head, KL penalty against
the frozen reference, GAE, clipped losses); algo: grpo and algo: rloo run TRL's GRPOTrainer and
RLOOTrainer on the same prompts, reward model and sampling settings (`ppo.steps` rollout batches of
`ppo.rollout_batch_size` responses each, so the three spend the same sampling budget). Prompts come
from any SFT-style file (the prompt part of each row) or a plain text column. eval.json holds the
mean reward of sampled responses on held-out prompts for the starting policy and the trained one
(same prompts, seed and sampling settings) and the trained policy's KL to the reference. The `grpo:`
section picks TRL's GRPO variant (loss_type, importance_sampling_level, scale_rewards, epsilon_high,
mask_truncated_completions; TRL's defaults, see tunekit.rl.trl_algos).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunekit.config import Section
from tunekit.errors import UserError
from tunekit.generation import ChatRecipe
from tunekit.jsontypes import Metrics, Row
from tunekit.method import Method, Setup
from tunekit.rl.judge import Keep
from tunekit.rl.prompts import PromptData, read_prompts
from tunekit.rl.rewards import RewardFunctionSection, as_sections, check_reward_functions
from tunekit.rl.trl_algos import GrpoSection
from tunekit.runs.plots import plot_rewards
from tunekit.train_section import TrainSection

# rlhf samples its own training data: the full distribution at temperature 1, short responses.
GENERATION_DEFAULTS = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0}
RESERVED = {
    "max_steps": "use ppo.steps (rollout batches)",
    "num_train_epochs": "use ppo.steps (rollout batches)",
    "per_device_train_batch_size": "use ppo.rollout_batch_size and ppo.minibatch_size",
    "gradient_accumulation_steps": "use ppo.forward_batch_size (a minibatch goes through the model in forward "
                                   "batches of that many rows, their gradients accumulated)",
    "max_grad_norm": "use ppo.max_grad_norm",
}


class RlhfSection(Section):
    algo: Literal["ppo", "grpo", "rloo"] = Field(
        "ppo", description="ppo: tunekit's PPO with a value head; grpo / rloo: TRL's trainers, same reward and prompts")
    reward_model: str | None = Field(None, description="run folder of a `tunekit reward` run that scores the responses")
    chat_template: bool = Field(
        True, description="true: prompts are user messages in the chat template; false: raw text the policy continues")
    eval_prompts: int = Field(100, gt=0, description="held-out prompts for reward_before / reward_after in eval.json")
    num_generations: int = Field(4, ge=2, description="grpo / rloo: responses per prompt (the group of the baseline)")
    reward_batch_size: int = Field(32, gt=0, description="texts per reward-model forward pass")
    shown_samples: int = Field(3, ge=0, description="sample responses logged to metrics.jsonl per logging step")

    reward_fn: list[RewardFunctionSection] = Field(
        default_factory=list, description="reward functions (exact_answer, regex, module:function, file.py:function), "
                                          "alone or added to the reward model's score; a name alone is a list of one")
    reward_model_weight: float = Field(1.0, description="weight of the reward model's score beside rlhf.reward_fn")
    judge: str | None = Field(None, description="run folder of a `tunekit reward` or `tunekit classify` run that scores "
                                                "held-out responses beside the reward, never trained against "
                                                "(tunekit.rl.judge: eval/judge, win rate in eval.json)")
    judge_label: str | int | None = Field(None, description="classify judge: the class whose probability is its score; "
                                                            "default: 1 or positive")
    keep: Keep = Field("last", description="last: the final policy; best_judge: the policy of the evaluation point "
                                           "(ppo.eval_steps) with the highest judge mean, put back at the end")

    _reward_fn_shorthand = field_validator("reward_fn", mode="before")(as_sections)

    @model_validator(mode="after")
    def _needs_a_reward(self) -> RlhfSection:
        if not self.reward_model and not self.reward_fn:
            raise ValueError(f"{self.algo} needs a reward: set rlhf.reward_model to a `tunekit reward` run folder, "
                             "rlhf.reward_fn to a reward function (e.g. exact_answer), or both")
        if self.keep == "best_judge" and not self.judge:
            raise ValueError("keep: best_judge needs a judge; set rlhf.judge to a reward or classify run folder")
        return self


class PpoSection(Section):
    steps: int = Field(100, gt=0, description="rollout batches (each: generate, score, update)")
    rollout_batch_size: int = Field(32, gt=0, description="responses sampled per step and process")
    minibatch_size: int = Field(8, gt=0, description="responses per optimizer step")
    epochs: int = Field(4, gt=0, description="passes over each rollout batch (grpo / rloo: TRL's num_iterations, "
                                                          "which grpo.num_iterations may set instead)")
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip epsilon")
    value_clip_range: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient (initial, when adaptive; grpo / rloo: beta)")
    kl_target: float | None = Field(
        None, gt=0, description="adaptive KL: target KL per response (InstructGPT / Ziegler et al.); null = fixed")
    kl_horizon: int = Field(10000, gt=0, description="adaptive KL: samples over which the coefficient adapts")
    whiten_advantages: bool = Field(True, description="normalise advantages over each rollout batch")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = off")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the score of a response that never ended (EOS); null = off")
    forward_batch_size: int | None = Field(
        None, gt=0, description="rows per forward pass in rollouts and updates (gradients accumulated over a "
                                "minibatch): memory, apart from the PPO settings; null = a whole batch at once")
    eval_steps: int | None = Field(
        10, gt=0, description="with rlhf.judge: every N rounds (and after the last) score the held-out prompts with the "
                              "reward and the judge (eval/proxy, eval/judge, eval/kl); null = before and after only")

    @model_validator(mode="after")
    def _minibatch_fits(self) -> PpoSection:
        if self.minibatch_size > self.rollout_batch_size:
            raise ValueError(f"ppo.minibatch_size ({self.minibatch_size}) is larger than ppo.rollout_batch_size "
                             f"({self.rollout_batch_size}); lower ppo.minibatch_size")
        return self


# `train:` defaults of `tunekit rlhf` (the user's values win)
TRAIN_DEFAULTS = {"learning_rate": 1e-5, "logging_steps": 10, "save_steps": 25}


class Config(ChatRecipe):
    """An RLHF recipe: a policy, its prompts, the reward, and the algorithm's settings."""

    train_section = TrainSection(defaults=TRAIN_DEFAULTS, reserved=RESERVED)
    data: PromptData
    rlhf: RlhfSection
    ppo: PpoSection = PpoSection()
    grpo: GrpoSection = Field(GrpoSection(), description="TRL's GRPO variants (loss_type, scale_rewards, ...)")

    @model_validator(mode="before")
    @classmethod
    def _generation_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("generation", {}), dict):
            data = {**data, "generation": {**GENERATION_DEFAULTS, **data.get("generation", {})}}
        return data

    def build_args(self) -> Any:
        """PPO's typed `train:` keys; GRPO and RLOO build TRL's config from `train:` (tunekit.rl.trl_algos)."""
        from tunekit.rl.ppo import PpoTraining

        return PpoTraining.model_validate(self.train)


    @model_validator(mode="after")
    def _groups_fit(self) -> Config:
        size, group, mini = self.ppo.rollout_batch_size, self.rlhf.num_generations, self.ppo.minibatch_size
        if self.rlhf.algo != "ppo" and (size % group or size % mini):
            raise ValueError(f"{self.rlhf.algo}: ppo.rollout_batch_size ({size}) must be a multiple of "
                             f"rlhf.num_generations ({group}) and of ppo.minibatch_size ({mini}); change one of them")
        return self

    @model_validator(mode="after")
    def _grpo_options_fit_the_algo(self) -> Config:
        """grpo.num_iterations is ppo.epochs under TRL's name: it sets it, unless ppo.epochs says otherwise;
        an option the algorithm does not read is refused (tunekit.rl.trl_algos)."""
        passes = self.grpo.num_iterations
        if passes is not None and passes != self.ppo.epochs:
            if "epochs" in self.ppo.model_fields_set:
                raise ValueError(f"grpo.num_iterations: {passes}, but ppo.epochs: {self.ppo.epochs}; they are one setting "
                                 "(passes over each rollout batch), keep one of them")
            self.ppo.epochs = passes
        refused = self.grpo.refused_for(self.rlhf.algo)
        if refused:
            raise ValueError(refused)
        return self

    @model_validator(mode="after")
    def _judge_points_fit(self) -> Config:
        if self.rlhf.algo != "ppo" and self.rlhf.judge and (self.rlhf.keep != "last" or "eval_steps" in self.ppo.model_fields_set
                                                            and self.ppo.eval_steps):
            raise ValueError(f"{self.rlhf.algo}: the judge scores before and after training only (evaluation points are "
                             "PPO's); set ppo.eval_steps: null and rlhf.keep: last")
        if self.rlhf.keep == "best_judge" and not self.ppo.eval_steps:
            raise ValueError("rlhf.keep: best_judge picks among evaluation points; set ppo.eval_steps")
        return self


@dataclass
class Data:
    train: list[list[dict[str, str]]]  # prompt conversations
    eval: list[list[dict[str, str]]]
    train_rows: list[Row] = field(default_factory=list)  # each prompt's data row, for rlhf.reward_fn
    eval_rows: list[Row] = field(default_factory=list)


def check_ppo(config: Config) -> None:
    """What tunekit's PPO cannot honour, refused in one line before any model is loaded: a `train:`
    key it does not read (tunekit.rl.ppo.PpoTraining), unless the user left it at its device default."""
    from tunekit.rl.ppo import PpoTraining
    from tunekit.train_section import device_defaults

    read = tuple(PpoTraining.model_fields)
    defaults = device_defaults(on_gpu=not config.args.use_cpu)
    for key, value in config.train.items():
        if key not in read and not (key in defaults and value == defaults[key]):
            raise UserError(f"{config.source}: train.{key}: not used by tunekit's PPO (it reads {', '.join(read)}; "
                            "the `ppo:` section holds the rest)")
    if config.generation.top_p < 1:
        # PPO's ratio and KL measure the full tempered softmax (for the policy and the reference
        # alike); a nucleus would sample from another distribution than the one measured.
        raise UserError(f"{config.source}: generation.top_p: {config.generation.top_p} is not supported by PPO (its "
                        "log-probs measure the full distribution); set generation.top_p: 1, or lower "
                        "generation.temperature to sharpen sampling")


def check(config: Config) -> Data:
    """Read the prompts and check the `train:` keys; no model is loaded (the reward run may not exist yet)."""
    if config.generation.temperature <= 0:
        raise UserError(f"{config.source}: generation.temperature: rlhf samples its training data; set it above 0")
    if config.rlhf.algo == "ppo":
        check_ppo(config)
    check_reward_functions(config.rlhf.reward_fn, config.source)
    train, train_rows = read_prompts(config.data.train, config, "data.train")
    if config.data.train_limit:
        train, train_rows = train[: config.data.train_limit], train_rows[: config.data.train_limit]
    if config.data.eval:
        held_out, held_out_rows = read_prompts(config.data.eval, config, "data.eval")
    elif config.data.eval_size:
        if config.data.eval_size >= len(train):
            raise UserError(f"{config.source}: data.eval_size: {config.data.eval_size} leaves no training prompts")
        size = config.data.eval_size
        held_out, held_out_rows = train[-size:], train_rows[-size:]
        train, train_rows = train[:-size], train_rows[:-size]
    else:
        raise UserError(f"{config.source}: data.eval: held-out prompts are needed for eval.json; "
                        "set data.eval or data.eval_size")
    count = config.rlhf.eval_prompts
    data = Data(train, held_out[:count], train_rows, held_out_rows[:count])
    if config.rlhf.judge and Path(config.rlhf.judge).exists():  # a chain may train it later: checked again at run time
        judge_class(config, data)
    return data


def judge_class(config: Config, data: Data) -> int | None:
    """rlhf.judge checked against the held-out prompts' text (tunekit.rl.judge); no model is loaded."""
    from tunekit.rl.judge import check_judge

    texts = [prompt[-1]["content"] for prompt in data.eval[:64]]
    return check_judge(config.rlhf.judge, config.rlhf.judge_label, texts, config.source)


# ---------------------------------------------------------------------------------------------
# Running


def load_policy(config: Config) -> tuple[Any, Any]:
    from tunekit.models import load_causal_lm

    if config.peft.quantize != "none":
        raise UserError(f"{config.source}: peft.quantize: not supported by rlhf yet; set peft.quantize: none")
    model, tokenizer = load_causal_lm(config.model, config.peft)
    tokenizer.padding_side = "left"
    return model, tokenizer


def this_process_device(config: Config) -> Any:
    """This process's GPU (LOCAL_RANK) when there is one and train.use_cpu is off, else the CPU."""
    import torch

    if torch.cuda.is_available() and not config.args.use_cpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def frozen_reference(config: Config, policy: Any) -> Any:
    """Full fine-tuning: a frozen copy of the starting policy. LoRA: None (the adapter is switched off)."""
    if hasattr(policy, "disable_adapter"):
        return None
    import copy

    return copy.deepcopy(policy).eval().requires_grad_(False)


def setup(config: Config, data: Data, run: Any) -> Any:
    """rlhf's parts: the policy, its reward and prompts; training is tunekit's PPO loop or TRL's GRPO /
    RLOO, between two evaluations on the held-out prompts (same prompts, seed and sampling)."""
    from tunekit.rl.judge import Judge, JudgeTracker, judge_metrics
    from tunekit.rl.rewards import build_rewards
    from tunekit.rl.rollout import evaluate_rows, make_prompts
    from tunekit.runs.folder import checkpoint_step
    from tunekit.training import status_on_error

    positive = judge_class(config, data) if config.rlhf.judge else None  # before the policy loads
    reward = build_rewards(config.rlhf.reward_model, config.rlhf.reward_model_weight, config.rlhf.reward_fn,
                           config.rlhf.reward_batch_size)  # the reward too: the smaller model, and the likelier to be wrong
    policy, tokenizer = load_policy(config)
    device = this_process_device(config)  # the evaluation before training samples there too
    policy.to(device)
    reward.to(device)
    judge = Judge(config.rlhf.judge, config.rlhf.reward_batch_size, positive).to(device) if config.rlhf.judge else None
    train = make_prompts(data.train, tokenizer, config.rlhf.chat_template, data.train_rows)
    held_out = make_prompts(data.eval, tokenizer, config.rlhf.chat_template, data.eval_rows)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    measured: dict[str, Any] = {}

    def measure(lm: Any, reference: Any, with_kl: bool = True) -> Any:
        return evaluate_rows(lm, reference, tokenizer, reward, held_out, config.generation, config.generation.seed,
                             with_kl=with_kl, judge=judge)

    tracker = JudgeTracker(run, config.ppo.eval_steps, config.ppo.steps, config.rlhf.keep, measure) if judge else None

    def train_model(run: Any, resume: Path | None) -> tuple[Any, Any]:
        with status_on_error(run):
            measured["before"] = measure(policy, None, with_kl=False)  # the policy is its own reference
            if tracker:
                tracker.start(measured["before"], checkpoint_step(Path(resume)) if resume else None)
            trained, reference = train_policy(config, policy, tokenizer, reward, train, run, resume, tracker)
            measured["after"] = (tracker and tracker.finish(trained)) or measure(trained, reference)
        return trained, reference

    def report(trained: Any) -> Metrics:
        before, after = measured["before"].means(), measured["after"].means()
        metrics = {"reward_before": before["reward"], "reward_after": after["reward"], "kl": after["kl"],
                   "response_length_before": before["response_length"],
                   "response_length_after": after["response_length"]}
        for key in before:  # the reward's components, when it has several: reward/exact_answer -> exact_answer_before
            if key.startswith("reward/"):
                metrics[f"{key.removeprefix('reward/')}_before"] = before[key]
                metrics[f"{key.removeprefix('reward/')}_after"] = after[key]
        if judge:
            metrics.update(judge_metrics(measured["before"], measured["after"], tracker))
        if run.enabled:  # the first process writes the run folder; two writers of one chart would race
            plot_rewards(run.path / "metrics.jsonl", run.path / "reward.png", kl_per_token=config.rlhf.algo != "ppo")
        return metrics

    info = {"train_data": config.data.train, "eval_data": config.data.eval or f"last {config.data.eval_size} rows",
            "train_rows": len(train), "eval_rows": len(held_out), "num_processes": world,
            "effective_batch_size": config.ppo.rollout_batch_size * world, "algo": config.rlhf.algo,
            "reward_model": config.rlhf.reward_model, "judge": config.rlhf.judge, "reward_fn": ", ".join(f.name for f in config.rlhf.reward_fn) or None}
    return Setup(policy, tokenizer, info, train_model, report, trained_model=lambda result: result[0])


def train_policy(config: Config, policy: Any, tokenizer: Any, reward: Any, prompts: list[Any], run: Any,
                 resume: Path | None = None, tracker: Any = None) -> tuple[Any, Any]:
    """Train with the chosen algorithm; (trained policy, its reference for the KL in eval.json)."""
    reference = frozen_reference(config, policy)
    if config.rlhf.algo != "ppo":
        from tunekit.rl.trl_algos import train_with_trl

        return train_with_trl(config, policy, tokenizer, reward, prompts, run, resume), reference
    trainer = ppo_trainer(config, policy, tokenizer, reward, prompts, run, reference,
                          on_step=tracker.at_step if tracker else None)
    if resume:
        trainer.load_checkpoint(Path(resume))
        run.forget_after(trainer.step)
    trainer.train()
    return trainer.policy, reference


def ppo_trainer(config: Config, policy: Any, tokenizer: Any, reward: Any, prompts: list[Any], run: Any,
                reference: Any, on_step: Any = None) -> Any:
    """tunekit's PPO trainer with the recipe's settings (bench/gpu.py times this same trainer)."""
    from tunekit.rl.ppo import PPOTrainer

    return PPOTrainer(policy, tokenizer, reward, prompts, config.ppo, config.generation, config.args, log=run.log,
                      reference=reference, shown_samples=config.rlhf.shown_samples, checkpoints=run, on_step=on_step)


METHOD = Method("rlhf", "Tune a causal LM against a reward model: PPO (tunekit's own), or --set rlhf.algo=grpo|rloo.",
                Config, check, setup, task=lambda config: "causal-lm", loss_units="in reward units",
                step_unit="rounds of rollouts")
