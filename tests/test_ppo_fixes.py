"""The defects of issue 16 in tunekit's PPO, one test each: on-policy sampling, the adaptive KL on
several processes, one precision for both log-probs, resuming (generation settings, every rank's RNG),
the reward model's own length, the `train:` keys PPO honours or refuses, micro-batched forwards,
sharded engines refused, no KL before training, and one of each shared piece."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import test_ppo
import torch
from conftest import ROOT, write
from test_imports import import_graph
from test_ppo import read_metrics, rlhf_recipe

reward_run = test_ppo.reward_run  # the stand-in reward run fixture, shared with test_ppo.py

PROMPTS = ["the film is", "a movie that", "i think this", "what a", "the plot of", "it was a"]


def tiny_lm(tiny_gpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(tiny_gpt).eval(), tokenizer


# 1. ------------------------------------------------------------------------------------------


def test_rollout_logprobs_are_the_sampling_distribution(tiny_gpt):
    """The log-probs PPO uses equal generate()'s own processed scores for the sampled tokens: no
    top-k (transformers' default 50) or other warper reshapes what is sampled."""
    from tunekit.rl.rollout import lm_logprobs, sample

    lm, tokenizer = tiny_lm(tiny_gpt)
    assert lm.config.vocab_size > 50
    scores = []
    generate = lm.generate

    def spy(**kwargs):
        out = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, dim=1))
        return out.sequences

    lm.generate = spy
    settings = SimpleNamespace(max_new_tokens=8, temperature=0.7, top_p=1.0, seed=0)
    torch.manual_seed(0)
    samples = sample(lm, tokenizer, PROMPTS, settings)
    sampled = torch.gather(scores[0].log_softmax(-1), 2, samples.responses.unsqueeze(-1)).squeeze(-1)
    ours = lm_logprobs(lm, samples, settings.temperature)
    mask = samples.response_mask.bool()
    assert torch.allclose(ours[mask], sampled[mask], atol=1e-4), (ours[mask] - sampled[mask]).abs().max()


# 2. ------------------------------------------------------------------------------------------

KL_ON_TWO_RANKS = """
import sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from tunekit.rl import ppo
from tunekit.rl.ppo_math import AdaptiveKLController

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
assert accelerator.num_processes == 2
# One PPO step with the rollout and the update stubbed: rank 0 measures KL 0.9, rank 1 KL 1.1.
trainer = object.__new__(ppo.PPOTrainer)
trainer.accelerator, trainer.model, trainer.optimizer, trainer.scheduler = accelerator, None, None, None
trainer.settings = SimpleNamespace(rollout_batch_size=4)
trainer.generation, trainer.seed, trainer.step = SimpleNamespace(temperature=1.0), 0, 1
trainer.kl = AdaptiveKLController(0.05, 1.0, 80)
trainer.rollout = lambda prompts: (None, {"kl": 0.9 + 0.2 * rank}, [])
ppo.minibatch_epochs = lambda *args, **kwargs: {}
stats, _ = trainer.ppo_step([])
with open(f"{sys.argv[1]}/rank-{rank}.txt", "w") as out:  # one file per rank: no interleaved stdout
    out.write(f"{rank} {stats['kl']!r} {trainer.kl.value!r}")
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # a rank leaving a live gloo group may abort at exit
"""


def test_adaptive_kl_moves_with_the_mean_over_two_processes(tmp_path):
    """2 processes, ppo.kl_target 1.0, KL 0.9 on one rank and 1.1 on the other: the mean is on
    target, so both ranks keep the same, unchanged coefficient."""
    script = write(tmp_path / "kl.py", KL_ON_TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [(tmp_path / f"rank-{r}.txt").read_text().split() for r in (0, 1)]
    assert [float(line[1]) for line in lines] == pytest.approx([1.0, 1.0])  # the all-rank mean KL
    assert [float(line[2]) for line in lines] == [0.05, 0.05]


def free_port():
    from tunekit.launch import free_port

    return free_port()


# 4. ------------------------------------------------------------------------------------------


def run_two_processes(recipe, out, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunekit", "rlhf", str(recipe), "--nproc", "2", "-o", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_resume_restores_every_ranks_rng(tmp_path, cli, tiny_gpt, reward_run):
    """Each rank's RNG states go into the checkpoint (rank-N.pt, with the KL coefficient, equal on
    all), and a resumed 2-process run repeats the run exactly; a resume that changes generation.*
    (which decides the rollouts) is refused in one line."""
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 4, "rollout_batch_size": 4, "minibatch_size": 2, "epochs": 1,
                              "kl_target": 1.0, "kl_horizon": 100})
    straight = tmp_path / "straight"
    proc = run_two_processes(recipe, straight, "--set", "train.save_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(straight)
    checkpoint = straight / "checkpoint-2"
    ranks = [torch.load(checkpoint / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"] == pytest.approx(records[1]["kl_coef"])
    assert not torch.equal(ranks[0]["cpu_rng"], ranks[1]["cpu_rng"])  # each rank samples its own responses

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    changed = cli("rlhf", recipe, "-o", resumed, "--resume", "--set", "generation.temperature=0.5")
    assert changed.code == 2 and "generation.temperature: 1.0 -> 0.5" in changed.err, changed.err
    assert changed.err.count("\n") == 1
    proc = run_two_processes(recipe, resumed, "--resume", "--set", "train.save_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for key in ("reward", "kl", "kl_coef"):
        assert [r[key] for r in again] == pytest.approx([r[key] for r in records]), key
    name = "model/model.safetensors"
    assert (resumed / name).read_bytes() == (straight / name).read_bytes()


# 3. and 9. -----------------------------------------------------------------------------------


def test_bf16_first_step_kl_is_zero_and_no_kl_before_training(tmp_path, cli, tiny_gpt, reward_run, monkeypatch):
    """Under bf16 autocast the policy and the reference are measured at one precision, so before
    any update the KL is exactly 0; and the evaluation before training computes no KL (the policy
    is its own reference then): the first log-prob forward belongs to the first PPO step."""
    from tunekit.rl import ppo, rollout

    events = []
    logprobs, step = rollout.lm_logprobs, ppo.PPOTrainer.ppo_step
    monkeypatch.setattr(rollout, "lm_logprobs", lambda *a, **k: events.append("logprobs") or logprobs(*a, **k))
    monkeypatch.setattr(ppo.PPOTrainer, "ppo_step", lambda self, p: events.append("step") or step(self, p))
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 1, "rollout_batch_size": 4, "minibatch_size": 4, "epochs": 1})
    result = cli("rlhf", recipe, "-o", tmp_path / "run", "--set", "train.bf16=true")
    assert result.code == 0, result.err
    assert read_metrics(tmp_path / "run")[0]["kl"] == 0.0
    assert events[0] == "step", events


# 5. ------------------------------------------------------------------------------------------


def test_reward_texts_are_cut_at_the_reward_runs_max_length(reward_run, tmp_path, monkeypatch):
    from tunekit.rl import reward_scores
    from tunekit.rl.rollout import RewardModel, make_prompts

    run = tmp_path / "reward"
    shutil.copytree(reward_run, run)
    text = (run / "config.yaml").read_text()
    write(run / "config.yaml", text + "train:\n  max_length: 8\n")
    lengths = []
    encode = reward_scores.encode
    monkeypatch.setattr(reward_scores, "encode", lambda t, text, n: lengths.append(n) or encode(t, text, n))
    model = RewardModel(str(run))
    prompts = make_prompts([[{"role": "user", "content": "the film is"}]], model.tokenizer, chat_template=False)
    model.score(prompts, [" good " * 40])
    assert lengths == [8]


# 6. ------------------------------------------------------------------------------------------


def test_train_keys_are_honoured_or_refused(tmp_path, cli, tiny_gpt, reward_run):
    """train.report_to (TensorBoard) and train.lr_scheduler_type act on PPO; a key PPO cannot
    honour is one line, exit 2."""
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 3, "rollout_batch_size": 4, "minibatch_size": 2, "epochs": 1})
    for override, expected in {
        "train.gradient_accumulation_steps=2": "train.gradient_accumulation_steps: set by tunekit; use ppo.forward_batch_size",
        "train.label_smoothing_factor=0.1": "train.label_smoothing_factor: not used by tunekit's PPO",
    }.items():
        result = cli("rlhf", recipe, "--dry-run", "--set", override)
        assert result.code == 2 and expected in result.err and result.err.count("\n") == 1, (override, result.err)
    out = tmp_path / "run"
    result = cli("rlhf", recipe, "-o", out, "--set", "train.report_to=tensorboard", "--set",
                 "train.lr_scheduler_type=linear")
    assert result.code == 0, result.err
    rates = [r["learning_rate"] for r in read_metrics(out)]
    assert rates == pytest.approx([1e-3 * (1 - 2 * s / 6) for s in (1, 2, 3)])  # 2 optimizer steps per PPO step
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard events"


# 7. ------------------------------------------------------------------------------------------


def test_forward_batches_bound_memory_and_keep_the_update(tiny_gpt):
    """ppo.forward_batch_size: no forward pass sees more rows, and the rollout log-probs and one
    minibatch update are those of the whole batch at once."""
    from accelerate import Accelerator

    from tunekit.rl.ppo_model import Batch, PolicyWithValue, minibatch_epochs, rollout_forward
    from tunekit.rl.rollout import lm_logprobs, sample

    lm, tokenizer = tiny_lm(tiny_gpt)
    torch.manual_seed(0)
    samples = sample(lm, tokenizer, PROMPTS[:4], SimpleNamespace(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0))
    rows = []
    # the decoder body: PPO's forward passes run the LM head themselves, on the response positions
    lm.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])), with_kwargs=True)
    assert torch.allclose(lm_logprobs(lm, samples, 1.0, 2), lm_logprobs(lm, samples, 1.0), atol=1e-5)

    def update(forward_batch_size):
        torch.manual_seed(1)
        fresh = tiny_lm(tiny_gpt)[0]
        fresh.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                        with_kwargs=True)
        model = PolicyWithValue(fresh).eval()
        values, logprobs, _ = rollout_forward(model, samples, 1.0, forward_batch_size)
        mask = samples.response_mask.float()
        advantages = torch.randn_like(mask) * mask
        batch = Batch(samples.query_responses, samples.attention_mask, samples.responses, mask, logprobs, values,
                      advantages, advantages + values)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        settings = SimpleNamespace(epochs=1, minibatch_size=4, forward_batch_size=forward_batch_size, clip_range=0.2,
                                   value_clip_range=0.2, vf_coef=0.1, max_grad_norm=None)
        stats = minibatch_epochs(model, optimizer, Accelerator(cpu=True), batch, settings, 1.0, seed=0)
        return stats, [p.detach().clone() for p in model.parameters()]

    rows.clear()
    chunked_stats, chunked = update(2)
    assert rows and max(rows) <= 2, rows
    whole_stats, whole = update(None)
    assert chunked_stats == pytest.approx(whole_stats, abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(chunked, whole))


def test_forward_batches_leave_out_all_padding_columns_with_the_same_loss(tiny_gpt):
    """A forward batch drops the columns that are padding in all its rows (left of the longest
    query, right of the longest response); its loss and gradients are those of the padded batch."""
    from tunekit.rl.ppo_model import Batch, PolicyWithValue, ppo_loss, rollout_forward
    from tunekit.rl.rollout import sample

    lm, tokenizer = tiny_lm(tiny_gpt)
    torch.manual_seed(0)
    samples = sample(lm, tokenizer, PROMPTS[:4], SimpleNamespace(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0))
    model = PolicyWithValue(lm).eval()
    torch.nn.init.normal_(model.value_head.weight)
    values, logprobs, _ = rollout_forward(model, samples, 1.0, None)
    mask = samples.response_mask.float()
    advantages = torch.randn_like(mask) * mask

    def pad(t, left, right, value):  # one more padding column on each side of the query + response
        return torch.nn.functional.pad(t, (left, right), value=value)

    padded = Batch(pad(samples.query_responses, 1, 1, tokenizer.pad_token_id), pad(samples.attention_mask, 1, 1, 0),
                   pad(samples.responses, 0, 1, tokenizer.pad_token_id), pad(mask, 0, 1, 0), pad(logprobs, 0, 1, 0),
                   pad(values, 0, 1, 0), pad(advantages, 0, 1, 0), pad(advantages + values, 0, 1, 0))
    trimmed = padded.without_padding()
    assert trimmed.query_responses.shape[1] <= padded.query_responses.shape[1] - 2
    assert trimmed.response_mask.all(dim=0).any() and trimmed.response_mask[:, -1].any()
    settings = SimpleNamespace(clip_range=0.2, value_clip_range=0.2, vf_coef=0.1)

    def loss_and_grads(batch):
        model.zero_grad()
        loss, stats = ppo_loss(model, batch, settings, 1.0)
        loss.backward()
        return stats, [p.grad.clone() for p in model.parameters()]

    trimmed_stats, trimmed_grads = loss_and_grads(trimmed)
    padded_stats, padded_grads = loss_and_grads(padded)
    assert {k: v.item() for k, v in trimmed_stats.items()} == pytest.approx(
        {k: v.item() for k, v in padded_stats.items()}, abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(trimmed_grads, padded_grads))


# 8. ------------------------------------------------------------------------------------------


def test_sharded_engines_are_refused_for_ppo(tmp_path, cli, tiny_gpt, reward_run):
    """FSDP / DeepSpeed configs: one line, exit 2, before any process starts (tunekit.launch.check_engine)."""
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run})
    for name in ("fsdp", "deepspeed-zero2"):
        result = cli("rlhf", recipe, "--dry-run", "--accelerate-config", ROOT / "recipes" / "accelerate" / f"{name}.yaml")
        assert result.code == 2 and result.err.count("\n") == 1, result.err
    result = cli("rlhf", recipe, "--dry-run", "--accelerate-config", ROOT / "recipes" / "accelerate" / "fsdp.yaml")
    assert "rlhf.algo: ppo does not run under fsdp" in result.err, result.err


# 1. (config) and 10. -------------------------------------------------------------------------


def test_nucleus_sampling_is_refused_for_ppo(tmp_path, cli, tiny_gpt, reward_run):
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run})
    result = cli("rlhf", recipe, "--dry-run", "--set", "generation.top_p=0.9")
    assert result.code == 2 and "generation.top_p: 0.9 is not supported by PPO" in result.err
    assert result.err.count("\n") == 1


def test_shared_pieces_exist_once():
    """One sampling call, one prompt reader, one generation section, one plot, no import circle
    between the PPO trainer and the rollout."""
    from tunekit.methods import dpo, rlhf, sft
    from tunekit.runs import plots

    package = ROOT / "tunekit"
    assert "tunekit.rl.ppo" not in import_graph()["tunekit.rl.rollout"]
    sections = {cls.model_fields["generation"].annotation for cls in (sft.Config, dpo.Config, rlhf.Config)}
    assert len(sections) == 1
    sources = {p: p.read_text() for p in package.rglob("*.py")}
    # lmeval's greedy answers aside, one function calls generate()
    callers = [p.name for p, text in sources.items() if ".generate(" in text and p.name != "lmeval.py"]
    assert callers == ["generation.py"], callers
    assert rlhf.plot_rewards.__module__ == plots.__name__  # the one module of charts
    assert "table.require(\"text\"" not in sources[package / "methods" / "rlhf.py"]  # read by masking.prompts_of_table
