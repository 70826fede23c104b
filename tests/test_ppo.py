"""RLHF: PPO's math against hand-computed values on small tensors, the recipe checks, and few-step
runs of PPO (full and LoRA), GRPO and RLOO on tiny models with a stand-in reward model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED, write

from tunekit.rl.ppo_math import (
    AdaptiveKLController,
    gae,
    kl_penalized_rewards,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)


def close(actual, expected, tol=1e-5):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), atol=tol)


def test_masked_mean_and_whiten_ignore_padding():
    values, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert close(masked_mean(values, mask), 2.0)
    # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1: (x - 2) / 1, padding 0
    assert close(whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)
    assert close(whiten(values, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-4)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ended after 2 tokens
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: delta_2 = 1 - 0.3 = 0.7; delta_1 = 0.3 - 0.4 = -0.1 -> -0.1 + 0.5 * 0.7 = 0.25;
    #        delta_0 = 0.4 - 0.5 = -0.1 -> -0.1 + 0.5 * 0.25 = 0.025
    # row 2: the padded value 5 is ignored: delta_1 = 2 + 0 - 1 = 1; delta_0 = 0 + 1 - 1 = 0 -> 0.5
    assert close(advantages, [[0.025, 0.25, 0.7], [0.5, 1.0, 0.0]])
    assert close(returns, [[0.525, 0.65, 1.0], [1.5, 2.0, 0.0]])
    discounted, _ = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert close(discounted, [[0.9, 1.0]])  # lam = 1, zero values: the discounted return


def test_kl_penalty_per_token_and_score_on_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = kl_penalized_rewards(logprobs, ref, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    assert close(kl, [[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 2.0, 0.0], [-0.1, 0.0, -1.0]])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    loss, clip_fraction, approx_kl = policy_loss(new, old, advantages, torch.ones(1, 3), clip_range=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped); token 3: -2.2
    assert close(loss, (-1.2 + 0.8 - 2.2) / 3)
    assert close(clip_fraction, 2 / 3)
    assert close(approx_kl, 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3)


def test_clipped_value_loss_by_hand():
    old, new, returns = torch.zeros(1, 2), torch.tensor([[0.5, -0.1]]), torch.ones(1, 2)
    loss, clip_fraction = value_loss(new, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 1: clipped value 0.2: max((0.5 - 1)^2, (0.2 - 1)^2) = 0.64; token 2: (-1.1)^2 = 1.21
    assert close(loss, 0.5 * (0.64 + 1.21) / 2)
    assert close(clip_fraction, 0.5)


def test_adaptive_kl_controller():
    high = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    high.update(current_kl=12.0, n_samples=256)  # error +1 clipped to +0.2
    assert high.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    low = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    low.update(current_kl=5.4, n_samples=100)  # error -0.1
    assert low.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    fixed = AdaptiveKLController(0.1, target=None, horizon=10000)
    fixed.update(current_kl=100.0, n_samples=256)
    assert fixed.value == 0.1


def entropy(logits):
    """The per-row entropy tunekit.lean_loss.tempered_logprobs reports (at temperature 1)."""
    from tunekit.lean_loss import tempered_logprobs

    return tempered_logprobs(logits, torch.zeros(logits.shape[:-1], dtype=torch.long), 1.0, with_entropy=True)[1]


def test_entropy_of_uniform_and_certain():
    assert close(entropy(torch.zeros(1, 4)), [math.log(4)])
    assert close(entropy(torch.tensor([[100.0, 0.0, 0.0]])), [0.0], tol=1e-4)


def tiny_llama_and_batch():
    """A one-layer Llama (vocabulary 50) in eval mode and 3 rows of 9 tokens, responses after column
    5, the first row's query left-padded: (model, ids, attention mask, context)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)).eval()
    ids, context = torch.randint(0, 50, (3, 9)), 5
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded query
    return lm, ids, mask, context


def test_lm_head_runs_on_the_response_positions_only(monkeypatch):
    """PPO's forward passes run the LM head on the positions that predict a response token only,
    a chunk of rows at a time; the log-probs, entropies and values equal those of a full forward
    pass, also for a model whose head is not plain (asked for logits_to_keep), and for one that
    ignores logits_to_keep."""
    import torch.nn.functional as F

    from tunekit import lean_loss
    from tunekit.rl.ppo_model import PolicyWithValue
    from tunekit.rl.rollout import Samples, lm_logprobs, position_ids

    lm, ids, mask, context = tiny_llama_and_batch()
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True)
    tempered = out.logits[:, context - 1 : -1] / 0.7
    expected = torch.gather(tempered.log_softmax(-1), 2, ids[:, context:, None]).squeeze(-1).tolist()
    policy = PolicyWithValue(lm)
    torch.nn.init.normal_(policy.value_head.weight)
    expected_values = policy.value_head(out.hidden_states[-1][:, context - 1 : -1]).squeeze(-1).tolist()
    seen = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: (w.shape[0] == 50 and seen.append(x.shape)) or linear(x, w, b))
    monkeypatch.setattr(lean_loss, "CHUNK_ELEMENTS", 5 * 50)  # five rows of logits a chunk
    with torch.no_grad():
        logprobs, entropies, values = policy(ids, mask, context, 0.7, with_entropy=True)
    assert close(logprobs, expected) and close(values, expected_values)
    direct = -(tempered.softmax(-1) * tempered.log_softmax(-1)).sum(-1)  # the entropy, computed here
    assert close(entropies, direct.tolist())
    assert [shape[0] for shape in seen] == [5, 5, 2]  # 3 rows x 4 response positions, not 3 x 9
    samples = Samples(ids, mask, ids[:, context:], torch.ones(3, 4, dtype=torch.long), torch.ones(3, dtype=torch.bool),
                      ["", "", ""])
    assert close(lm_logprobs(lm, samples, 0.7), expected)

    class IgnoresLogitsToKeep(torch.nn.Module):  # not a plain head: the logits_to_keep path
        config = lm.config

        def forward(self, logits_to_keep: int = 0, **inputs):
            return lm(**inputs)

    assert close(lm_logprobs(IgnoresLogitsToKeep(), samples, 0.7), expected)
    fallback = PolicyWithValue(IgnoresLogitsToKeep())
    fallback.value_head = policy.value_head
    with torch.no_grad():
        logprobs, entropies, values = fallback(ids, mask, context, 0.7, with_entropy=True)
    assert close(logprobs, expected) and close(values, expected_values) and close(entropies, direct.tolist())


def test_the_padding_after_a_response_is_not_scored(monkeypatch):
    """A response that ended early is followed by padding (attention mask 0) up to the batch's longest
    one: the LM head skips those positions, their log-probs and entropies are 0, and the response's
    own log-probs and their gradients equal a full forward pass's."""
    import torch.nn.functional as F

    from tunekit.rl.ppo_model import PolicyWithValue
    from tunekit.rl.rollout import position_ids

    lm, ids, mask, context = tiny_llama_and_batch()
    mask[1, 7:] = 0  # a response of 2 tokens, then padding
    scored = mask[:, context:].bool()
    out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    tempered = (out.logits[:, context - 1 : -1] / 0.7).log_softmax(-1)
    expected = torch.gather(tempered, 2, ids[:, context:, None]).squeeze(-1)
    upstream = torch.randn(3, 4)
    (expected * upstream)[scored].sum().backward()
    wanted = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    seen = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: (w.shape[0] == 50 and seen.append(x.shape)) or linear(x, w, b))
    logprobs, _, _ = PolicyWithValue(lm)(ids, mask, context, 0.7)
    (logprobs * upstream).sum().backward()
    assert [shape[0] for shape in seen] == [10]  # 3 x 4 response positions less the 2 of padding
    assert close(logprobs[scored], expected[scored].tolist()) and logprobs[~scored].eq(0).all()
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(lm.parameters(), wanted))
    with torch.no_grad():
        _, entropies, _ = PolicyWithValue(lm)(ids, mask, context, 0.7, with_entropy=True)
    assert entropies[~scored].eq(0).all() and entropies[scored].gt(0).all()


def test_chunked_log_probs_have_the_gradients_of_one_pass(monkeypatch):
    """With more rows than one chunk holds, each chunk's logits are made again in the backward pass:
    the gradients of the rows and of the head equal those of the whole batch at once."""
    from tunekit import lean_loss

    torch.manual_seed(0)
    rows, weight, bias = torch.randn(7, 6, requires_grad=True), torch.randn(11, 6, requires_grad=True), None
    targets, upstream = torch.randint(0, 11, (7,)), torch.randn(7)

    def grads():
        rows.grad = weight.grad = None
        picked, _ = lean_loss.token_logprobs(rows, weight, bias, targets, 0.7)
        (picked * upstream).sum().backward()
        return picked.detach(), rows.grad.clone(), weight.grad.clone()

    whole = grads()
    monkeypatch.setattr(lean_loss, "CHUNK_ELEMENTS", 2 * 11)
    chunked = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked))


def test_checkpointed_ppo_update_has_the_same_loss_and_gradients(tiny_gpt):
    """train.activation_checkpointing for PPO: the policy stays in eval mode, its decoder layers are
    recomputed in the backward pass (fewer tensors kept), and the loss and gradients are unchanged."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from tunekit.rl.ppo_model import Batch, PolicyWithValue, ppo_loss

    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    context = 7
    response_mask = torch.ones(2, 5)
    settings = SimpleNamespace(clip_range=0.2, value_clip_range=0.2, vf_coef=0.1)

    def update(checkpointing):
        torch.manual_seed(0)
        model = PolicyWithValue(AutoModelForCausalLM.from_pretrained(tiny_gpt), checkpointing).eval()
        torch.nn.init.normal_(model.value_head.weight)
        batch = Batch(ids, mask, ids[:, context:], response_mask, torch.full((2, 5), -4.0), torch.zeros(2, 5),
                      torch.randn(2, 5), torch.randn(2, 5))
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            loss, _ = ppo_loss(model, batch, settings, 0.7)
        loss.backward()
        assert not any(m.training for m in model.modules())
        return loss.item(), [p.grad for p in model.parameters()], sum(kept)

    plain_loss, plain_grads, plain_kept = update(False)
    loss, grads, kept = update(True)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, grads))
    assert kept < plain_kept / 2, (kept, plain_kept)


# ---------------------------------------------------------------------------------------------
# Recipes and runs


@pytest.fixture(scope="module")
def reward_run(tiny_bert, tmp_path_factory):
    """A stand-in `tunekit reward` run: the tiny BERT with a one-output head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("reward-run")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1)
    model.save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder / "model")
    write(folder / "run.json", json.dumps({"method": "reward", "status": "done"}))
    write(folder / "config.yaml", f"method: reward\nmodel:\n  name: {tiny_bert}\n")
    return folder


def rlhf_recipe(tmp_path, policy, reward, **sections):
    extra = "".join(f"{name}:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items()) for name, keys in sections.items())
    return write(tmp_path / "rlhf.yaml", f"""\
method: rlhf
model:
  name: {policy}
data:
  train: {SHARED}/sst2/train.tsv
  columns: {{text: sentence}}
  prompt_words: 3
  train_limit: 64
  eval_size: 8
generation:
  max_new_tokens: 6
train:
  learning_rate: 1.0e-3
  logging_steps: 1
{extra}""")


def test_recipe_checks_are_exit_2(tmp_path, cli, tiny_gpt, reward_run):
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run})
    assert cli("rlhf", recipe, "--dry-run").code == 0
    cases = {
        "rlhf.reward_model=": "ppo needs a reward: set rlhf.reward_model",
        "ppo.minibatch_size=64": "lower ppo.minibatch_size",
        "train.label_smoothing_factor=0.1": "train.label_smoothing_factor: not used by tunekit's PPO",
        "train.max_steps=10": "train.max_steps: set by tunekit; use ppo.steps",
        "data.prompt_words=1000": "no prompts left with more than data.prompt_words=1000 words",
        "ppo.kl_coeff=0.1": "ppo.kl_coeff: unknown key; did you mean kl_coef?",
    }
    for override, expected in cases.items():
        result = cli("rlhf", recipe, "--dry-run", "--set", override)
        assert result.code == 2 and expected in result.err and result.err.count("\n") == 1, (override, result.err)
    result = cli("rlhf", recipe, "--dry-run", "--set", "rlhf.algo=grpo", "--set", "ppo.rollout_batch_size=30")
    assert result.code == 2 and "must be a multiple of rlhf.num_generations (4)" in result.err


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_few_step_ppo(tmp_path, cli, tiny_gpt, reward_run, peft):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 3, "rollout_batch_size": 8, "minibatch_size": 4, "epochs": 2,
                              "missing_eos_penalty": 1.0, "kl_target": 1.0})
    result = cli("rlhf", recipe, "-o", out, "--set", f"peft.method={peft}")
    assert result.code == 0, result.err
    assert result.last_line == str(out)
    metrics = json.loads((out / "eval.json").read_text())
    assert {"reward_before", "reward_after", "kl"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    expected = {"reward", "score", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clip_fraction",
                "approx_kl", "response_length", "samples"}
    assert expected <= set(records[0]) and len(records[0]["samples"]) == 3
    assert records[-1]["kl_coef"] != 0.05  # adaptive
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (out / "loss.png").is_file() and (out / "reward.png").is_file() and (out / "README.md").is_file()
    if peft == "lora":
        assert not (out / "model").exists()
        weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)  # the adapter moved
    else:
        trained = load_file(out / "model" / "model.safetensors")
        start = load_file(tiny_gpt / "model.safetensors")
        assert any(not torch.equal(trained[k], start[k]) for k in start)
    generated = cli("generate", out, "--prompt", "the film is", "--max-new-tokens", "4")
    assert generated.code == 0, generated.err


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_few_step_trl_algos_report_the_same_metrics(tmp_path, cli, tiny_gpt, reward_run, algo):
    out = tmp_path / "run"
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "algo": algo,
                                                               "num_generations": 2},
                         ppo={"steps": 2, "rollout_batch_size": 8, "minibatch_size": 4, "epochs": 1})
    result = cli("rlhf", recipe, "-o", out, "--set", "peft.method=lora")
    assert result.code == 0, result.err
    metrics = json.loads((out / "eval.json").read_text())
    assert {"reward_before", "reward_after", "kl"} <= set(metrics)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert {"reward", "entropy", "response_length", "clip_fraction", "samples"} <= set(records[0])
    assert (out / "adapter").is_dir() and (out / "reward.png").is_file()


@pytest.mark.parametrize(("fault", "code"), [("kill-after-save:2", -9), ("interrupt-rank-0:3", 130)])
def test_ppo_resume_continues_steps_and_kl_controller(tmp_path, cli, tiny_gpt, reward_run, fault, code):
    """Killed with SIGKILL after the step-2 checkpoint, or stopped with Ctrl-C in step 3 (which
    saves checkpoint-3), resumed: the same steps, KL coefficients and final policy as a run never
    interrupted."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 4, "rollout_batch_size": 8, "minibatch_size": 4, "epochs": 1, "kl_target": 1.0})
    overrides = ["--set", "train.save_steps=2", "--set", "train.use_cpu=true"]  # bit-equal: a CPU property
    assert cli("rlhf", recipe, "-o", tmp_path / "straight", *overrides).code == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEKIT_FAULT": fault}
    killed = subprocess.run([sys.executable, "-m", "tunekit", "rlhf", str(recipe), "-o", str(tmp_path / "killed"), *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == code, killed.stderr[-2000:]
    if code == 130:
        assert (tmp_path / "killed" / "checkpoint-3" / "tunekit-checkpoint.json").is_file()
        assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "interrupted"
    resumed = cli("rlhf", recipe, "-o", tmp_path / "killed", "--resume", *overrides)
    assert resumed.code == 0, resumed.err
    straight, again = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["kl_coef"] for r in again] == pytest.approx([r["kl_coef"] for r in straight])
    assert [r["reward"] for r in again] == pytest.approx([r["reward"] for r in straight])
    name = "model/model.safetensors"
    assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_ppo_on_two_processes(tmp_path, tiny_gpt, reward_run):
    """Each rank samples and scores its own prompts; statistics are averaged over both."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 2, "rollout_batch_size": 4, "minibatch_size": 2, "epochs": 1})
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunekit", "rlhf", str(recipe), "--nproc", "2", "-o", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    info = json.loads((out / "run.json").read_text())
    assert info["num_processes"] == 2 and info["effective_batch_size"] == 8
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert {"reward_before", "reward_after", "kl"} <= set(json.loads((out / "eval.json").read_text()))


def test_grpo_resumes_from_a_checkpoint(tmp_path, cli, tiny_gpt, reward_run):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "algo": "grpo",
                                                               "num_generations": 2},
                         ppo={"steps": 3, "rollout_batch_size": 4, "minibatch_size": 4, "epochs": 1})
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEKIT_FAULT": "kill-after-save:2"}
    killed = subprocess.run([sys.executable, "-m", "tunekit", "rlhf", str(recipe), "-o", str(out), "--set",
                             "train.save_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = cli("rlhf", recipe, "-o", out, "--resume", "--set", "train.save_steps=2")
    assert resumed.code == 0, resumed.err
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
