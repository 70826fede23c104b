"""`rlhf.algo: grpo | rloo`: TRL's GRPOTrainer / RLOOTrainer (checked against TRL 1.16) with the
recipe's prompts, reward model and sampling settings, mapped so that the sampling budget matches PPO's:
`ppo.steps` generation rounds of `ppo.rollout_batch_size` responses (`rlhf.num_generations` per
prompt), each used for `ppo.epochs` passes in minibatches of `ppo.minibatch_size`. The per-step log
gets tunekit's metric names beside TRL's own.

The recipe's `grpo:` section (GrpoSection) holds the options that define today's GRPO variants
(Dr. GRPO, DAPO, GSPO, ...), under TRL's names and with TRL 1.16's defaults, so that a recipe without
the section trains exactly as before: loss_type dapo, importance_sampling_level token,
scale_rewards group, epsilon_high = ppo.clip_range, mask_truncated_completions false. It is a
section of its own beside `ppo:` (not keys of `rlhf:`) because its keys are TRL's, read by TRL's
trainers only. loss_type, importance_sampling_level and scale_rewards are GRPOTrainer's alone;
epsilon_high and mask_truncated_completions RLOOTrainer has too; tunekit's PPO reads none of them
(`refused_for` says which, `tunekit rlhf` refuses them before a model loads).

num_iterations, TRL's name for the passes over each generation round, is `ppo.epochs`: one setting
with one value. `grpo.num_iterations` may be given instead (it then sets ppo.epochs, and both show
in config.yaml); given beside a different ppo.epochs it is refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunekit.config import Section
from tunekit.errors import UserError
from tunekit.rl.rewards import component_means

# The losses of TRL 1.16's GRPOConfig.loss_type (trl/trainer/grpo_config.py).
LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
GRPO_ONLY = ("loss_type", "importance_sampling_level", "scale_rewards")


class GrpoSection(Section):
    """`grpo:` TRL's GRPO options (checked against TRL 1.16); the defaults are TRL's, so a recipe
    without the section trains as it did before the section existed."""

    loss_type: LossType = Field(
        "dapo", description="how token losses are summed: dapo (TRL's default: over the active tokens of the "
        "accumulated batch, no length bias), grpo (per sequence length: the original paper, length-biased), dr_grpo "
        "(over a constant, max_new_tokens), bnpo (active tokens of the local batch), cispo, sapo, luspo (needs "
        "importance_sampling_level: sequence), vespo; algo grpo only")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="the policy ratio per token (GRPO, TRL's default) or one per response, the mean of "
        "its tokens' log-ratios (sequence = GSPO; the GSPO paper pairs it with loss_type: grpo); algo grpo only")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="what a reward's advantage is divided by: the std of its group (TRL's default, the "
        "GRPO paper), of the whole batch (PPO Lite), or nothing (none: Dr. GRPO, no question-difficulty bias); "
        "true / false mean group / none, as in TRL; algo grpo only")
    epsilon_high: float | None = Field(
        None, gt=0, description="upper clip range of the policy ratio (DAPO's clip-higher suggests 0.28; cispo: "
        "its epsilon max, e.g. 5.0); null: the same as ppo.clip_range, TRL's default; algo grpo and rloo")
    mask_truncated_completions: bool = Field(
        False, description="leave responses that hit generation.max_new_tokens out of the loss (DAPO); off by "
        "default, as in TRL, since short max_new_tokens would drop most of tunekit's small demos; algo grpo and rloo")
    num_iterations: int | None = Field(
        None, gt=0, description="passes over each rollout batch: TRL's name for ppo.epochs, which it sets (null: "
        "ppo.epochs decides); algo grpo and rloo")

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _booleans_as_trl_reads_them(cls, value: Any) -> Any:
        return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _loss_fits_its_level(self) -> GrpoSection:
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("loss_type luspo is a sequence-level loss; set importance_sampling_level: sequence")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("loss_type vespo weighs whole sequences itself; set importance_sampling_level: token")
        return self

    def refused_for(self, algo: str) -> str | None:
        """The first option set away from its default that `algo` does not read, as an error line
        that names it; None when every option fits."""
        changed = [key for key, field in type(self).model_fields.items() if getattr(self, key) != field.default]
        for key in changed:
            if algo == "ppo":
                instead = "set ppo.epochs" if key == "num_iterations" else "set rlhf.algo: grpo, or remove it"
                return f"grpo.{key}: not read by rlhf.algo ppo (tunekit's PPO, not TRL's); {instead}"
            if algo == "rloo" and key in GRPO_ONLY:
                return f"grpo.{key}: not read by rlhf.algo rloo (TRL's RLOOTrainer has no {key}); set rlhf.algo: grpo, or remove it"
        return None

# TRL's log key -> tunekit's name (the PPO trainer's), where the two mean the same thing.
RENAMED = {
    "completions/mean_length": "response_length",
    "clip_ratio/region_mean": "clip_fraction",
    "entropy": "entropy",
    "loss": "loss",
}


def trl_arguments(config: Any, run: Any) -> Any:
    from trl import GRPOConfig, RLOOConfig

    ppo, generation = config.ppo, config.generation
    per_round = ppo.rollout_batch_size // ppo.minibatch_size  # optimizer steps per pass over a round
    train = dict(config.train)
    # transformers 5.24 names it activation_checkpointing; TRL's configs default the old name to True,
    # which warns (FutureWarning) unless the new one is given.
    train.setdefault("activation_checkpointing", train.pop("gradient_checkpointing", False))
    values = {
        **train,
        "output_dir": str(run.path),
        "max_steps": ppo.steps * per_round * ppo.epochs,
        "logging_steps": train["logging_steps"] * per_round * ppo.epochs,
        "per_device_train_batch_size": ppo.minibatch_size,
        "steps_per_generation": per_round,
        "num_iterations": ppo.epochs,
        "num_generations": config.rlhf.num_generations,
        "max_completion_length": generation.max_new_tokens,
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "beta": ppo.kl_coef,
        "epsilon": ppo.clip_range,
        "max_grad_norm": ppo.max_grad_norm or 0.0,
        "save_strategy": "steps",  # every train.save_steps rounds, in the trainer's optimizer steps
        "save_steps": train["save_steps"] * per_round * ppo.epochs,
        "save_total_limit": 1,
        "disable_dropout": True,
        "epsilon_high": config.grpo.epsilon_high,
        "mask_truncated_completions": config.grpo.mask_truncated_completions,
    }
    if config.rlhf.algo == "grpo":
        values.update({key: getattr(config.grpo, key) for key in GRPO_ONLY})
    cls = GRPOConfig if config.rlhf.algo == "grpo" else RLOOConfig
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise UserError(f"train: {str(err).splitlines()[0]}") from None


class RewardFunction:
    """The reward model as TRL's reward function: scores prompt + completion with the reward model's
    own tokenizer, less ppo.missing_eos_penalty for a completion that never ended; keeps the last
    batch's first few samples for the log."""

    __name__ = "reward_model"

    def __init__(self, reward: Any, prompts: list[Any], penalty: float | None, eos_token_id: int, shown: int) -> None:
        self.reward, self.prompts, self.penalty, self.eos = reward, prompts, penalty, eos_token_id
        self.shown, self.samples = shown, []
        self.components: list[dict[str, float]] = []  # per call since the last log: reward/<name> means

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 prompt_index: list[int], **kwargs: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        items = [self.prompts[i] for i in prompt_index]
        raw = self.reward.score(items, texts).tolist()
        self.components.append(component_means(self.reward))
        self.samples = [{"prompt": p.shown, "response": t, "reward": round(r, 4)}
                        for p, t, r in list(zip(items, texts, raw))[: self.shown]]
        if self.penalty is None:
            return raw
        return [r - self.penalty * (self.eos not in ids) for r, ids in zip(raw, completion_ids)]


    def take_components(self) -> dict[str, float]:
        """The mean of each reward component over the calls since the last log."""
        calls, self.components = self.components, []
        keys = calls[0] if calls else {}
        return {key: sum(c[key] for c in calls) / len(calls) for key in keys}


def metrics_callback(run: Any, per_step: int, reward_function: RewardFunction) -> Any:
    from transformers import TrainerCallback

    class TrlMetrics(TrainerCallback):
        """TRL's logs in metrics.jsonl, with the step counted in generation rounds (as PPO's)."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if not logs or not state.is_world_process_zero or "train_runtime" in logs:
                return
            record = {"step": state.global_step // per_step, **logs}
            record.update({ours: logs[theirs] for theirs, ours in RENAMED.items() if theirs in logs})
            if "completions/clipped_ratio" in logs:
                record["ended_fraction"] = 1.0 - logs["completions/clipped_ratio"]
            if "reward" in logs:
                record["score"] = logs["reward"]  # after the missing-EOS penalty, as PPO's `score`
            record.update(reward_function.take_components())
            record["samples"] = reward_function.samples
            run.log(record)

    return TrlMetrics()


def train_with_trl(config: Any, policy: Any, tokenizer: Any, reward: Any, prompts: list[Any], run: Any,
                   resume: Any = None) -> Any:
    """Train with GRPO or RLOO (from a checkpoint, if given); returns the trained policy."""
    from datasets import Dataset
    from trl import GRPOTrainer, RLOOTrainer

    from tunekit.runs.folder import checkpoint_step
    from tunekit.training import CheckpointMarks, train_interruptibly

    args = trl_arguments(config, run)
    if config.rlhf.chat_template:  # conversations: TRL renders them with the same chat template
        rows = [{"prompt": p.reward_prompt, "prompt_index": i} for i, p in enumerate(prompts)]
    else:  # raw text to continue, as a plain string
        rows = [{"prompt": p.policy_text, "prompt_index": i} for i, p in enumerate(prompts)]
    function = RewardFunction(reward, prompts, config.ppo.missing_eos_penalty, tokenizer.eos_token_id,
                              config.rlhf.shown_samples)
    trainer_class = GRPOTrainer if config.rlhf.algo == "grpo" else RLOOTrainer
    per_step = (config.ppo.rollout_batch_size // config.ppo.minibatch_size) * config.ppo.epochs
    trainer = trainer_class(model=policy, reward_funcs=[function], args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer,
                            callbacks=[metrics_callback(run, per_step, function), CheckpointMarks(run)])
    reward.to(trainer.accelerator.device)
    if resume:
        run.forget_after(checkpoint_step(resume) // per_step)
    train_interruptibly(trainer, run, resume)
    tokenizer.padding_side = "left"  # TRL may have changed it; tunekit's sampling pads on the left
    return trainer.accelerator.unwrap_model(trainer.model)
