"""PPO's math against hand-computed values on small tensors, and its forward passes' lean scoring
(the LM head on the response positions only, chunked log-probs, checkpointed updates) against a
full pass."""

from __future__ import annotations

import math

import pytest
import torch

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


def test_rows_are_packed_so_a_forward_pass_is_as_wide_as_its_longest_row():
    """A rollout batch is padded to its longest query and its longest response; when those are
    different rows, the forward pass runs on the rows moved left over their query's padding, as
    wide as the longest row (7 columns here, not 9), with the log-probs, values and gradients of the
    full pass over the padded batch."""
    from tunekit.rl.ppo_model import PolicyWithValue
    from tunekit.rl.rollout import position_ids

    lm, ids, mask, context = tiny_llama_and_batch()  # row 0: a query of 2 tokens after 3 of padding
    mask[1, 7:] = 0  # row 1: a query of 5, a response of 2
    mask[2, 6:] = 0  # row 2: a query of 5, a response of 1
    scored = mask[:, context:].bool()
    policy = PolicyWithValue(lm)
    torch.nn.init.normal_(policy.value_head.weight)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True)
    tempered = (out.logits[:, context - 1 : -1] / 0.7).log_softmax(-1)
    expected = torch.gather(tempered, 2, ids[:, context:, None]).squeeze(-1)
    expected_values = policy.value_head(out.hidden_states[-1][:, context - 1 : -1]).squeeze(-1)
    upstream = torch.randn(3, 4)
    ((expected * upstream)[scored].sum() + expected_values[scored].sum()).backward()
    wanted = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    widths = []
    lm.model.embed_tokens.register_forward_hook(lambda module, args, output: widths.append(args[0].shape[1]))
    logprobs, _, values = policy(ids, mask, context, 0.7)
    ((logprobs * upstream).sum() + values[scored].sum()).backward()
    assert widths == [7]  # the longest row (row 1: 5 + 2), not the longest query + the longest response
    assert close(logprobs[scored], expected[scored].tolist()) and logprobs[~scored].eq(0).all()
    assert close(values[scored], expected_values[scored].tolist())
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(policy.parameters(), wanted))


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
