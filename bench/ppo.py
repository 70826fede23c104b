"""PPO: reward gained per wall-clock minute of training, and peak memory, tunekit vs TRL 1.12.

    make bench-ppo        # or: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/ppo.py [--steps 60]
                          #     [--set KEY=VALUE ...] [--only tunekit|tunekit-lora|trl-1.12 ...]

Same policy (runs/sft-tiny-gpt-alpaca), reward model (runs/reward-minilm-sst2-sentiment), prompts
(first four words of SST-2 training sentences, raw-text continuation), sampling (16 new tokens,
temperature 1), PPO settings (rollout 32, minibatch 8, 4 epochs, clip 0.2, value clip 0.2, vf_coef
0.1, gamma 1, lam 0.95, KL coefficient 0.05, the recipe's learning rate and schedule, no gradient
clipping) and step budget, for:
  (t)  tunekit's PPO, full fine-tuning (value head on the policy, frozen reference copy);
  (tl) tunekit's PPO with LoRA (r 16; the reference is the policy with the adapter off);
  (o)  TRL 1.12's trl.experimental.ppo.PPOTrainer (deleted in TRL 1.13), full fine-tuning, with its
       separate value model initialised from the policy (TRL initialises it from the reward model,
       which here has another tokenizer) and its get_reward patched to score decoded text with the
       reward model's own tokenizer. TRL 1.12 is installed beside tunekit's TRL (pip --target
       /tmp/trl112, no dependencies: it runs on the same transformers 5.24 and torch) and runs in a
       child process with that folder first on PYTHONPATH.
Each trainer runs in its own child process (training time only; peak RSS of the child). The parent
then samples each trained policy on the same held-out SST-2 dev prompts (all 864 of more than four
words: on 100, the sampling noise of the mean reward is as large as the gains) with the same seed
(tunekit.rl.rollout.evaluate) and prints reward gain per minute and peak memory as ratios.

TRL 1.12 counts its batches differently: one PPO step samples per_device_train_batch_size x
gradient_accumulation_steps responses and splits them into num_mini_batches minibatches, one
optimizer step each. So tunekit's (rollout 32, minibatch 8) is TRL's (per_device_train_batch_size
32, gradient_accumulation_steps 1, num_mini_batches 4). TRL 1.12's PPO loop never clips gradients
(its max_grad_norm is accepted and ignored), so tunekit runs with ppo.max_grad_norm=null here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/peft.py would shadow the peft package

RECIPE = ROOT / "recipes" / "rlhf" / "tiny-gpt-sentiment-ppo.yaml"
TRL112 = Path("/tmp/trl112")
TRAINERS = ["tunekit", "tunekit-lora", "trl-1.12"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tunekit_child(spec: dict) -> dict:
    from tunekit.config import load_config
    from tunekit.methods import rlhf
    from tunekit.rl.rollout import RewardModel, make_prompts
    from tunekit.runs.folder import RunFolder

    config = load_config(rlhf.Config, str(RECIPE), spec["overrides"])
    data = rlhf.check(config)
    policy, tokenizer = rlhf.load_policy(config)
    reward = RewardModel(config.rlhf.reward_model, config.rlhf.reward_batch_size)
    prompts = make_prompts(data.train, tokenizer, config.rlhf.chat_template)
    run = RunFolder(Path(spec["out"]) / "run")
    run.path.mkdir(parents=True)
    start = time.time()
    trained, _ = rlhf.train_policy(config, policy, tokenizer, reward, prompts, run)
    seconds = time.time() - start
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    trained.save_pretrained(Path(spec["out"]) / "model")
    return {"train_s": seconds, "peak_rss_mb": peak_rss_mb()}


def trl_child(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    assert trl.__version__ == "1.12.0", trl.__version__
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    reward_tokenizer = AutoTokenizer.from_pretrained(Path(spec["reward"]) / "model")
    reward_model = AutoModelForSequenceClassification.from_pretrained(Path(spec["reward"]) / "model").eval()
    original = module.get_reward

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is not reward_model:  # the value model: TRL's own code
            return original(model, query_responses, pad_token_id, context_length)
        texts = tokenizer.batch_decode(query_responses, skip_special_tokens=True)
        batch = reward_tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        with torch.no_grad():
            return None, reward_model(**batch).logits[:, 0], None

    module.get_reward = get_reward
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in spec["prompts"]]
    dataset = Dataset.from_dict({"input_ids": ids})
    s = spec["settings"]
    args = PPOConfig(
        # TRL 1.12 samples per_device_train_batch_size x gradient_accumulation_steps responses per step and
        # splits them into num_mini_batches, one optimizer step each: tunekit's rollout and minibatch sizes
        output_dir=str(Path(spec["out"]) / "trl"), per_device_train_batch_size=s["rollout_batch_size"],
        gradient_accumulation_steps=1, num_mini_batches=s["rollout_batch_size"] // s["minibatch_size"],
        total_episodes=s["steps"] * s["rollout_batch_size"], num_ppo_epochs=s["epochs"],
        local_rollout_forward_batch_size=s["rollout_batch_size"], response_length=s["max_new_tokens"],
        temperature=s["temperature"], learning_rate=s["learning_rate"], kl_coef=s["kl_coef"], cliprange=s["clip_range"],
        cliprange_value=s["value_clip_range"], vf_coef=s["vf_coef"], gamma=s["gamma"], lam=s["lam"],
        lr_scheduler_type=s["lr_scheduler_type"], stop_token="eos", num_sample_generations=0, save_strategy="no",
        report_to="none", bf16=False, gradient_checkpointing=False, seed=s["seed"], logging_steps=10,
    )
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"])
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=AutoModelForCausalLM.from_pretrained(spec["policy"]),
        reward_model=reward_model, value_model=AutoModelForSequenceClassification.from_pretrained(spec["policy"], num_labels=1),
        train_dataset=dataset, eval_dataset=dataset.select(range(args.per_device_eval_batch_size)),
    )
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    trainer.policy_model.save_pretrained(Path(spec["out"]) / "model")
    return {"train_s": seconds, "peak_rss_mb": peak_rss_mb()}


def run_child(kind: str, spec: dict, workdir: Path) -> dict:
    spec_path = workdir / f"{kind}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if kind == "trl":
        env["PYTHONPATH"] = str(TRL112)
    result = subprocess.run([sys.executable, __file__, "--child", kind, "--spec", str(spec_path)], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-prompts", type=int, default=2000,
                        help="held-out prompts to score each policy on (default: all 864 SST-2 dev prompts)")
    parser.add_argument("--reward", help="another reward run than the recipe's")
    parser.add_argument("--policy", help="another policy model folder than the recipe's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every trainer (TRL gets the ppo, generation and learning-rate keys)")
    parser.add_argument("--only", action="append", choices=TRAINERS, help="run these trainers only")
    parser.add_argument("--child", choices=["tunekit", "trl"])
    parser.add_argument("--spec")
    options = parser.parse_args()
    if options.child:
        spec = json.loads(Path(options.spec).read_text())
        print(json.dumps(tunekit_child(spec) if options.child == "tunekit" else trl_child(spec)))
        return
    if not (TRL112 / "trl" / "experimental" / "ppo").is_dir():
        sys.exit(f"TRL 1.12 not found in {TRL112}: .venv/bin/pip install --no-deps --target {TRL112} trl==1.12.0")
    from tunekit.config import load_config
    from tunekit.methods import rlhf

    # no checkpoints (TRL runs with save_strategy "no"): training time only
    steps = [f"ppo.steps={options.steps}", "train.save_steps=1000000", "ppo.max_grad_norm=null"]
    steps += [f"rlhf.reward_model={options.reward}"] * bool(options.reward)
    steps += [f"model.name={options.policy}"] * bool(options.policy)
    steps += options.set
    config = load_config(rlhf.Config, str(RECIPE), [*steps, f"rlhf.eval_prompts={options.eval_prompts}"])
    data = rlhf.check(config)
    settings = {**config.ppo.model_dump(), **config.generation.model_dump(), "learning_rate": config.args.learning_rate,
                "lr_scheduler_type": config.args.lr_scheduler_type, "seed": config.args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = {}
        for name, kind, overrides in [("tunekit", "tunekit", steps), ("tunekit-lora", "tunekit", [*steps, "peft.method=lora"]),
                                      ("trl-1.12", "trl", steps)]:
            if options.only and name not in options.only:
                continue
            out = workdir / name
            spec = {"overrides": overrides, "out": str(out), "policy": config.model.name,
                    "reward": config.rlhf.reward_model, "prompts": [p[-1]["content"] for p in data.train],
                    "settings": settings}
            results[name] = {**run_child(kind, spec, workdir), "model": out / "model"}
            print(f"{name}: trained in {results[name]['train_s']:.0f} s, peak RSS {results[name]['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
        report(config, data, results)


def report(config, data, results) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.rl.rollout import RewardModel, evaluate, make_prompts

    tokenizer = AutoTokenizer.from_pretrained(config.model.name)
    reference = AutoModelForCausalLM.from_pretrained(config.model.name).eval()
    reward = RewardModel(config.rlhf.reward_model)
    held_out = make_prompts(data.eval, tokenizer, config.rlhf.chat_template)
    before = evaluate(reference, None, tokenizer, reward, held_out, config.generation, config.generation.seed,
                      with_kl=False)
    print(f"{config.ppo.steps} PPO steps of {config.ppo.rollout_batch_size} responses; reward on {len(held_out)} "
          f"held-out prompts before: {before['reward']:.3f}")
    print(f"{'trainer':<14} {'reward after':>12} {'KL':>6} {'train s':>8} {'gain/min':>9} {'peak RSS MB':>12}")
    for name, r in results.items():
        policy = AutoModelForCausalLM.from_pretrained(r["model"]).eval()
        after = evaluate(policy, reference, tokenizer, reward, held_out, config.generation, config.generation.seed)
        r["gain"] = after["reward"] - before["reward"]
        r["gain_per_min"] = r["gain"] / (r["train_s"] / 60)
        print(f"{name:<14} {after['reward']:>12.3f} {after['kl']:>6.2f} {r['train_s']:>8.0f} "
              f"{r['gain_per_min']:>9.3f} {r['peak_rss_mb']:>12.0f}")
    t, lora, trl = (results.get(name) for name in TRAINERS)
    if t and trl:
        print(f"reward gain per minute, tunekit / TRL 1.12: {t['gain_per_min'] / trl['gain_per_min']:.2f} "
              f"(time per step {trl['train_s'] / t['train_s']:.2f}x, gain per step {t['gain']:+.3f} against {trl['gain']:+.3f})")
        print(f"peak memory, tunekit / TRL 1.12: {t['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
    if t and lora:
        print(f"peak memory, tunekit LoRA / tunekit full: {lora['peak_rss_mb'] / t['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
