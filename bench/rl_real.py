"""The RL inner loop at a real model's shape: where a round of tunekit's PPO and GRPO goes, against
TRL's GRPOTrainer with its own defaults, and beside tunekit's SFT step.

    make bench-rl-real                     # = .venv/bin/python bench/rl_real.py; BENCH_RL_ARGS="..." adds options
    HF_HUB_OFFLINE=1 .venv/bin/python bench/rl_real.py [--model DIR] [--variants ...] [--rounds 2] [--warmup 1]
        [--batch 16] [--generations 4] [--max-new-tokens 48] [--threads N] [--set KEY=VALUE] [--json F]

SmolLM2-135M-Instruct (models/smollm2-135m-instruct, or --model: the arithmetic-SFT one,
runs/lora-smollm2-arith/merged, answers in the worked format) with a LoRA adapter (r 16, every
linear layer), on the hard arithmetic problems (data/arith-hard/train.jsonl, through the model's chat
template), rewarded by exact_answer: no reward model, so the figures are the policy's own. Every
round samples --batch responses (GRPO: --batch / --generations problems, --generations samples each;
PPO: --batch problems, one each) of at most --max-new-tokens tokens at temperature 0.7, then one
pass over them in two minibatches. Each variant runs in a process of its own (peak RSS = its VmHWM):

  ppo        `tunekit lora recipes/rlhf/smollm2-arith-ppo.yaml` (tunekit's PPO: value head, the
             reference = the adapter switched off, kl 0.02)
  grpo       `tunekit lora recipes/rlhf/smollm2-arith-grpo.yaml` (TRL's GRPOTrainer as tunekit sets
             it up: on a CPU float32, no gradient checkpointing, dropout off)
  trl        TRL's GRPOTrainer + PEFT with TRL 1.16's own defaults (bf16, gradient checkpointing),
             the same rows, reward, sampling, batch sizes, learning rate and beta 0
  trl-fp32   the same with bf16 off: what bf16 and checkpointing each cost, apart
  sft        tunekit's LoRA SFT step (bench/real.py's `tunekit` variant) at the minibatch size, the
             per-token rate PPO's update is held to: on the problems with the responses the `ppo`
             variant sampled when it ran first in the same command (the same sequences as PPO's
             update, the response as the completion), else on the problems with their worked answers

--set KEY=VALUE (repeatable) overrides the ppo and grpo recipes; --set
train.activation_checkpointing=true applies to the sft variant too.

Timed by wrapping, in the variant's process, the calls that make up a round: generation (tunekit's
`rollout.sample`; TRL's `GRPOTrainer._generate`), the whole rollout (generation, reward, old /
reference log-probs and values: `PPOTrainer.rollout`; `_generate_and_score_completions`) and the
update (`minibatch_epochs`; for TRL the training steps less the rollout they start). The first
--warmup rounds are left out. Rollout tokens/s = generated tokens / generation seconds; update
tokens/s = the real (non-padding) prompt + response tokens a pass trains on / update seconds; the
generating share = generation seconds / round seconds. Each part's system (kernel) CPU seconds and
minor page faults, the whole process's over the same calls (getrusage), are in the JSON lines
(`generate_system_s`, `update_faults`, ...): page faults found the cost that keeping freed memory
takes out (tunekit.memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # not bench/: bench/peft.py would shadow the peft package

import torch  # noqa: E402

# bench/real.py's first lines set the offline environment (before transformers or the hub load)
from bench import real  # noqa: E402
from bench.real import MODEL, ROOT  # noqa: E402

ROWS = ROOT / "data" / "arith-hard" / "train.jsonl"
RECIPES = {"ppo": ROOT / "recipes" / "rlhf" / "smollm2-arith-ppo.yaml", "grpo": ROOT / "recipes" / "rlhf" / "smollm2-arith-grpo.yaml"}
VARIANTS = ("ppo", "grpo", "trl", "trl-fp32", "sft")
PPO_ROWS = "ppo-rows.jsonl"  # the ppo variant's problems and responses, for the sft variant
TEMPERATURE, LEARNING_RATE, SEED = 0.7, 1e-4, 42


@dataclass
class Plan:
    model: str
    work: str
    rounds: int
    warmup: int
    batch: int
    generations: int
    max_new_tokens: int
    threads: int
    sets: list[str] = field(default_factory=list)  # --set KEY=VALUE for tunekit's variants


@dataclass
class Clock:
    """Seconds and tokens of each timed part, per round (round 0 = before the first rollout)."""

    round: int = 0
    # per call: (round, seconds, tokens, system CPU seconds, minor page faults)
    parts: dict[str, list[tuple[int, float, int, float, int]]] = field(default_factory=dict)
    training: bool = True  # False once training returns: the evaluation after it is not a round

    def add(self, part: str, seconds: float, tokens: int = 0, system_s: float = 0.0, faults: int = 0) -> None:
        if self.training:
            self.parts.setdefault(part, []).append((self.round, seconds, tokens, system_s, faults))

    def totals(self, part: str, warmup: int) -> tuple[float, int, float, int]:
        """Seconds, tokens, system CPU seconds and minor page faults (the whole process's) of a part's
        measured rounds."""
        kept = [call[1:] for call in self.parts.get(part, []) if call[0] > warmup]
        return (sum(c[0] for c in kept), sum(c[1] for c in kept), sum(c[2] for c in kept), sum(c[3] for c in kept))

    def measured(self, part: str, warmup: int) -> tuple[float, int]:
        return self.totals(part, warmup)[:2]

    def in_kernel(self, part: str, warmup: int) -> tuple[float, int]:
        return self.totals(part, warmup)[2:]


CLOCK = Clock()
SETTINGS: dict[str, Any] = {}  # the TRL variants' precision and checkpointing, as TRL resolved them


def timed(owner: Any, name: str, part: str, tokens: Any = None, starts_round: bool = False) -> None:
    """Wrap owner.name so that each call adds its seconds (and tokens(args, result)) to CLOCK."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if starts_round:
            CLOCK.round += 1
        start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        result = original(*args, **kwargs)
        after = resource.getrusage(resource.RUSAGE_SELF)
        CLOCK.add(part, time.perf_counter() - start, int(tokens(args, kwargs, result)) if tokens else 0,
                  after.ru_stime - usage.ru_stime, after.ru_minflt - usage.ru_minflt)
        return result

    setattr(owner, name, wrapper)


def stop_after(owner: Any, name: str) -> None:
    """Stop the clock when owner.name (the training loop) returns."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            CLOCK.training = False

    setattr(owner, name, wrapper)


def tunekit_overrides(plan: Plan, variant: str) -> list[str]:
    steps = plan.warmup + plan.rounds
    sets = [f"model.name={plan.model}", f"ppo.steps={steps}", f"ppo.rollout_batch_size={plan.batch}",
            f"ppo.minibatch_size={plan.batch // 2}", "ppo.epochs=1", f"generation.max_new_tokens={plan.max_new_tokens}",
            f"generation.temperature={TEMPERATURE}", f"peft.learning_rate={LEARNING_RATE}", "rlhf.eval_prompts=1",
            f"train.save_steps={steps + 1}", "train.logging_steps=1", f"train.seed={SEED}"]
    if variant == "grpo":
        sets.append(f"rlhf.num_generations={plan.generations}")
    sets += plan.sets
    return [item for s in sets for item in ("--set", s)]


def run_tunekit(plan: Plan, variant: str) -> None:
    from tunekit import cli
    from tunekit.rl import ppo, rollout

    timed(rollout, "sample", "generate", lambda a, k, r: r.response_mask.sum())
    timed(ppo.PPOTrainer, "rollout", "rollout", starts_round=True)
    timed(ppo, "minibatch_epochs", "update", lambda a, k, r: a[3].attention_mask.sum() * a[4].epochs)
    stop_after(ppo.PPOTrainer, "train")
    if variant == "ppo":
        keep_ppo_rows(Path(plan.work) / PPO_ROWS)
    patch_trl_grpo()
    try:
        cli.main(["lora", str(RECIPES[variant]), *tunekit_overrides(plan, variant),
                  "--output-dir", str(Path(plan.work) / variant), "--overwrite"])
    except SystemExit as stop:
        if stop.code:
            raise


def keep_ppo_rows(path: Path) -> None:
    """Write each training round's problems with PPO's sampled responses to `path` (prompt /
    completion rows), for the `sft` variant: the SFT step on the sequences PPO's update trained on."""
    from tunekit.rl import ppo, rollout

    sampled: list[str] = []
    sample, trainer_rollout = rollout.sample, ppo.PPOTrainer.rollout

    def sample_keeping(*args: Any, **kwargs: Any) -> Any:
        result = sample(*args, **kwargs)
        sampled[:] = result.texts
        return result

    def rollout_keeping(self: Any, prompts: list[Any]) -> Any:
        result = trainer_rollout(self, prompts)
        with path.open("a") as out:
            for prompt, text in zip(prompts, sampled):
                out.write(json.dumps({"prompt": prompt.shown, "completion": text}) + "\n")
        return result

    rollout.sample, ppo.PPOTrainer.rollout = sample_keeping, rollout_keeping


def patch_trl_grpo() -> None:
    """TRL's GRPOTrainer: generation, the rollout it is part of, and the training steps (each
    starting with the rollout when a new round begins)."""
    from trl import GRPOTrainer

    def trained_tokens(args: Any, kwargs: Any, result: Any) -> Any:
        inputs = args[2]  # compute_loss(self, model, inputs, ...): the prepared minibatch
        return inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()

    timed(GRPOTrainer, "_generate", "generate", lambda a, k, r: sum(len(ids) for ids in r[1]))
    timed(GRPOTrainer, "_generate_and_score_completions", "rollout", starts_round=True)
    timed(GRPOTrainer, "training_step", "steps")
    timed(GRPOTrainer, "compute_loss", "trained", trained_tokens)
    stop_after(GRPOTrainer, "train")


def run_trl(plan: Plan, variant: str) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tunekit.arithmetic import MARKER
    from tunekit.rl.rewards import exact_answer

    patch_trl_grpo()
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()[: plan.batch * (plan.warmup + plan.rounds)]]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])

    def reward(prompts: Any, completions: Any, answer: list[str], **kwargs: Any) -> list[float]:
        texts = [c[-1]["content"] for c in completions]
        return exact_answer(texts, [{"answer": a} for a in answer], "answer", MARKER, False)

    settings = {"bf16": False} if variant == "trl-fp32" else {}
    args = GRPOConfig(output_dir=str(Path(plan.work) / variant), max_steps=2 * (plan.warmup + plan.rounds),
                      per_device_train_batch_size=plan.batch // 2, steps_per_generation=2, num_iterations=1,
                      num_generations=plan.generations, max_completion_length=plan.max_new_tokens,
                      temperature=TEMPERATURE, top_p=1.0, beta=0.0, learning_rate=LEARNING_RATE,
                      lr_scheduler_type="constant", seed=SEED, report_to="none", save_strategy="no",
                      logging_steps=1, use_cpu=not torch.cuda.is_available(), **settings)
    model = AutoModelForCausalLM.from_pretrained(plan.model, dtype=torch.float32)
    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(plan.model), peft_config=lora)
    SETTINGS.update(bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing)
    trainer.train()


def run_sft(plan: Plan) -> dict[str, float]:
    """bench/real.py's tunekit LoRA step at the minibatch size (in a process of its own, as there), on
    the problems with PPO's sampled responses when the `ppo` variant ran first in this command (the
    same sequences as PPO's update), else on the problems with their worked answers."""
    from tunekit.config import apply_override

    overrides: dict[str, Any] = {}
    for item in plan.sets:  # read as the recipes read them
        apply_override(overrides, item)
    checkpointing = bool(overrides.get("train", {}).get("activation_checkpointing", False))
    responses = Path(plan.work) / PPO_ROWS
    sft = real.Plan(str(responses) if responses.is_file() else "arith-hard", "lora", plan.model, plan.work, plan.batch // 2,
                    256, 2 * plan.warmup, 2 * plan.rounds, LEARNING_RATE, plan.threads, checkpointing)
    rows = real.tokenized_rows(sft)
    real.rows_file(sft).write_text(json.dumps(rows))
    figures = real.measure(sft, "tunekit")
    tokens = sum(len(r["input_ids"]) for r in rows[sft.warmup * sft.batch : sft.rows])
    return {"update_s": figures["seconds"], "update_tokens": tokens, "peak_rss_mb": figures["peak_rss_mb"]}


def child(variant: str, plan: Plan) -> None:
    """`--one VARIANT`: run it and print its figures as the last line (JSON)."""
    torch.set_num_threads(plan.threads)
    started = time.perf_counter()
    if variant in RECIPES:
        run_tunekit(plan, variant)
    else:
        run_trl(plan, variant)
    generate_s, generated = CLOCK.measured("generate", plan.warmup)
    rollout_s, _ = CLOCK.measured("rollout", plan.warmup)
    kernel = {part: CLOCK.in_kernel(part, plan.warmup) for part in ("generate", "rollout", "update", "steps")}
    if "update" in CLOCK.parts:  # tunekit's PPO: the update is timed on its own
        update_s, update_tokens = CLOCK.measured("update", plan.warmup)
        update_kernel = kernel["update"]
    else:  # TRL: training steps, less the rollouts they started
        steps_s, _ = CLOCK.measured("steps", plan.warmup)
        update_s, update_tokens = steps_s - rollout_s, CLOCK.measured("trained", plan.warmup)[1]
        update_kernel = (kernel["steps"][0] - kernel["rollout"][0], kernel["steps"][1] - kernel["rollout"][1])
    print(json.dumps({"generate_s": generate_s, "generated_tokens": generated, "rollout_s": rollout_s,
                      "update_s": update_s, "update_tokens": update_tokens, "rounds_seen": CLOCK.round,
                      "generate_system_s": kernel["generate"][0], "generate_faults": kernel["generate"][1],
                      "rollout_system_s": kernel["rollout"][0], "rollout_faults": kernel["rollout"][1],
                      "update_system_s": update_kernel[0], "update_faults": update_kernel[1],
                      "process_s": time.perf_counter() - started, "peak_rss_mb": real.peak_rss_mb(), **SETTINGS}), flush=True)


def measure(plan: Plan, variant: str) -> dict[str, float]:
    if variant == "sft":
        return run_sft(plan)
    return real.in_child(__file__, variant, plan, Path(plan.work) / "plan.json", variant)


def table(plan: Plan, runs: dict[str, dict[str, float]]) -> str:
    lines = [f"model {plan.model}, {plan.threads} threads; {plan.rounds} rounds after {plan.warmup} warm-up, "
             f"{plan.batch} responses of <= {plan.max_new_tokens} tokens a round",
             "| variant | rollout tokens/s | update tokens/s | s/round | generating | rollout other | update | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        update = r["update_tokens"] / r["update_s"]
        if name == "sft":
            lines.append(f"| sft (LoRA step) | - | {update:.0f} | - | - | - | - | {r['peak_rss_mb']:.0f} |")
            continue
        round_s = r["rollout_s"] + r["update_s"]
        lines.append(f"| {name} | {r['generated_tokens'] / r['generate_s']:.1f} | {update:.0f} | "
                     f"{round_s / plan.rounds:.1f} | {100 * r['generate_s'] / round_s:.0f}% | "
                     f"{100 * (r['rollout_s'] - r['generate_s']) / round_s:.0f}% | {100 * r['update_s'] / round_s:.0f}% | "
                     f"{r['peak_rss_mb']:.0f} |")
    if "ppo" in runs and "sft" in runs:
        ratio = (runs["ppo"]["update_tokens"] / runs["ppo"]["update_s"]) / (runs["sft"]["update_tokens"] / runs["sft"]["update_s"])
        lines.append(f"PPO update / SFT step tokens/s: {ratio:.2f}")
    if "grpo" in runs:
        for other in ("trl", "trl-fp32"):
            if other in runs:
                a, b = runs["grpo"], runs[other]
                lines.append(f"grpo / {other}: round time {(b['rollout_s'] + b['update_s']) / (a['rollout_s'] + a['update_s']):.2f}x "
                             f"faster, peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL), help="the policy (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds, after --warmup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="responses a round (two minibatches)")
    parser.add_argument("--generations", type=int, default=4, help="GRPO: samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for tunekit's variants (train.activation_checkpointing=true: "
                             "the sft variant too)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        child(options.one, Plan(**json.loads(options.plan.read_text())))
        return
    if not Path(options.model, "config.json").is_file():
        raise SystemExit(f"bench/rl_real.py: {options.model}: no model folder; run `make models`")
    if not ROWS.is_file():
        raise SystemExit(f"bench/rl_real.py: {ROWS}: missing; run `python -m tunekit.arithmetic data/arith-hard --difficulty hard`")
    with tempfile.TemporaryDirectory() as tmp:
        plan = Plan(options.model, tmp, options.rounds, options.warmup, options.batch, options.generations,
                    options.max_new_tokens, options.threads, options.sets)
        runs = {}
        for variant in options.variants:
            runs[variant] = measure(plan, variant)
            print(json.dumps({"variant": variant, **runs[variant]}), flush=True)
    if options.json:
        options.json.write_text(json.dumps({"plan": asdict(plan), "runs": runs}, indent=1))
    print(table(plan, runs))


if __name__ == "__main__":
    main()
