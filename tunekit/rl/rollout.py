"""What every RLHF algorithm shares: prompts as the policy and the reward model see them, sampling
responses, scoring them with a reward model (its own tokenizer), log-probs under the policy and the
reference, and the held-out evaluation (mean reward, KL to the reference) that eval.json reports."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunekit.errors import UserError
from tunekit.generation import GenerationSection, generate_ids
from tunekit.jsontypes import Row
from tunekit.rl.reward_scores import RunScorer


@dataclass
class Prompt:
    """One prompt: the text the policy continues (chat-rendered, or raw text) and the prompt as the
    reward model sees it (the conversation, or the raw text that the response continues)."""

    policy_text: str
    reward_prompt: str | list[dict[str, str]]
    row: Row = field(default_factory=dict)  # the prompt's data row, for rlhf.reward_fn

    def reward_text(self, tokenizer: Any, response: str) -> str:
        """Prompt and response as the reward model scores them (tunekit reward's own layout)."""
        from tunekit.data.preference import full_text

        if isinstance(self.reward_prompt, str):
            return full_text(tokenizer, self.reward_prompt, response)
        return full_text(tokenizer, self.reward_prompt, [{"role": "assistant", "content": response}])

    @property
    def shown(self) -> str:
        return self.reward_prompt if isinstance(self.reward_prompt, str) else self.reward_prompt[-1]["content"]


def make_prompts(conversations: list[list[dict[str, str]]], tokenizer: Any, chat_template: bool,
                 rows: list[Row] | None = None) -> list[Prompt]:
    """Chat: the conversation rendered with the generation prompt. Raw: the last message's text, to be
    continued as plain text (a review's first words, say). `rows`: each prompt's data row."""
    rows = rows or [{} for _ in conversations]
    if not chat_template:
        return [Prompt(messages[-1]["content"], messages[-1]["content"], row) for messages, row in zip(conversations, rows)]
    return [Prompt(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), messages, row)
            for messages, row in zip(conversations, rows)]


class RewardModel(RunScorer):
    """A `tunekit reward` run's model and tokenizer: one scalar per text."""

    def __init__(self, run_dir: str, batch_size: int = 32) -> None:
        from tunekit.runs.folder import run_method

        path = Path(run_dir)
        if not (path / "run.json").is_file():
            raise UserError(f"rlhf.reward_model: {run_dir}: not a tunekit run folder; train one with `tunekit reward`")
        if run_method(path) != "reward":
            raise UserError(f"rlhf.reward_model: {run_dir}: a `tunekit {run_method(path)}` run, not a `tunekit reward` run")
        super().__init__(run_dir, batch_size)


def encode(tokenizer: Any, texts: list[str], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (generation continues from the right end)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@dataclass
class Samples:
    query_responses: torch.Tensor  # (B, Q + R)
    attention_mask: torch.Tensor  # (B, Q + R)
    responses: torch.Tensor  # (B, R), pad after the first EOS
    response_mask: torch.Tensor  # (B, R), 1 up to and including the first EOS
    ended: torch.Tensor  # (B,) bool: the response ended with EOS by itself
    texts: list[str]  # decoded responses, without EOS

    @property
    def context(self) -> int:
        return self.query_responses.shape[1] - self.responses.shape[1]


def sample(lm: Any, tokenizer: Any, texts: list[str], generation: GenerationSection) -> Samples:
    """Generate one response per prompt text, cut after the first EOS."""
    ids, mask = encode(tokenizer, texts, lm.device)
    responses = generate_ids(lm, tokenizer, ids, mask, generation)
    is_eos = responses == tokenizer.eos_token_id
    ended = is_eos.any(dim=1)
    first_eos = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(ended, responses.shape[1], dtype=torch.long))
    response_mask = (torch.arange(responses.shape[1], device=responses.device)[None, :] <= first_eos[:, None]).long()
    responses = torch.where(response_mask.bool(), responses, tokenizer.pad_token_id)
    decoded = [tokenizer.decode(row[: int(m.sum()) - int(e)], skip_special_tokens=True)
               for row, m, e in zip(responses.tolist(), response_mask, ended)]
    return Samples(torch.cat([ids, responses], dim=1), torch.cat([mask, response_mask], dim=1), responses,
                   response_mask, ended, decoded)


def scores_of(reward: RewardModel, prompts: list[Prompt], samples: Samples, missing_eos_penalty: float | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw reward-model scores, scores less the penalty for a response that never ended)."""
    raw = reward.score(prompts, samples.texts).to(samples.responses.device)
    if missing_eos_penalty is None:
        return raw, raw
    return raw, raw - missing_eos_penalty * (~samples.ended).float()


def response_scores(lm: Any, ids: torch.Tensor, mask: torch.Tensor, context: int, temperature: float,
                    with_entropy: bool = False, value_head: Any = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What PPO measures of the response tokens (the columns after `context`) under a causal LM:
    their log-probs under the tempered distribution they were sampled from, in float32; with
    `with_entropy` that distribution's entropy at each of them; with `value_head` its values at the
    positions that predict them. (log-probs, entropies or None, values or None).

    Only a response's own tokens are scored, up to and including its end (the columns where `mask` is
    1): the padding after a response that ended early gets log-prob and entropy 0, and every use of
    them is masked. The decoder runs on the rows packed (`packed`: as wide as the longest row, not
    the longest query plus the longest response), the LM head on the scored positions only, never on
    the query or the padding after a response, and a chunk of rows at a time
    (tunekit.lean_loss.token_logprobs): at a large vocabulary its output is the largest tensor of a
    forward pass, and its product a quarter of the work per response token. A model whose logits
    are not its head's plain output (tunekit.lean_loss.lean_parts) runs on the padded rows and is
    asked for the logits of the response positions (logits_to_keep) instead; counted from the end,
    so a model that ignores logits_to_keep gives the same result."""
    from tunekit.lean_loss import lean_parts, tempered_logprobs, token_logprobs

    responses = ids[:, context:]
    scored = mask[:, context:].bool()
    parts = lean_parts(lm)
    if parts is not None:
        body, head = parts
        ids, mask, starts = packed(ids, mask, context)
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
                      ).last_hidden_state
        # response token j of row i is predicted at the position before it: starts[i] - 1 + j
        at = starts[:, None] - 1 + torch.arange(responses.shape[1], device=ids.device)[None, :]
        hidden = hidden.gather(1, at.clamp(max=hidden.shape[1] - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        picked, entropy = token_logprobs(hidden[scored], head.weight, head.bias, responses[scored], temperature,
                                         with_entropy)
        logprobs = in_place_of(scored, picked)
        entropies = in_place_of(scored, entropy) if with_entropy else None
    else:
        out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                 output_hidden_states=value_head is not None, logits_to_keep=responses.shape[1] + 1)
        logprobs, entropies = tempered_logprobs(out.logits[:, -(responses.shape[1] + 1) : -1], responses, temperature,
                                                with_entropy)
        logprobs = logprobs.masked_fill(~scored, 0.0)
        entropies = entropies.masked_fill(~scored, 0.0) if with_entropy else None
        hidden = out.hidden_states[-1][:, context - 1 : -1] if value_head is not None else None
    values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1) if value_head is not None else None
    return logprobs, entropies, values


def packed(ids: torch.Tensor, mask: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of a rollout batch (query left-padded to `context` columns, response right-padded)
    moved left over their query's padding, so that each row's tokens start at column 0, and cut to
    the longest row: (ids, attention mask, the column where each row's response starts). A batch
    padded to its longest query and its longest response is wider than its longest row when the two
    are different rows; packed, a forward pass costs what the rows hold. A row's positions (from the
    attention mask) and what each of its tokens attends to stay the same."""
    pad = context - mask[:, :context].sum(1)  # each row's left padding
    lengths = mask.sum(1)
    width = int(lengths.max())
    columns = torch.arange(width, device=ids.device)[None, :]
    moved = ids.gather(1, (columns + pad[:, None]).clamp(max=ids.shape[1] - 1))
    return moved, (columns < lengths[:, None]).to(mask.dtype), context - pad


def in_place_of(where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A tensor of `where`'s shape holding `values` (one per True, in order) and 0 elsewhere; gradients
    flow back to `values`."""
    return torch.zeros(where.shape, dtype=values.dtype, device=values.device).masked_scatter(where, values)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them (so log-probs match the sampling)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def in_chunks(size: int | None, rows: int) -> list[slice]:
    """Row slices of at most `size` rows (all rows at once when size is None)."""
    size = size or rows
    return [slice(start, start + size) for start in range(0, rows, size)]


def lm_logprobs(lm: Any, samples: Samples, temperature: float, forward_batch_size: int | None = None) -> torch.Tensor:
    """Log-probs of the response tokens under a causal LM (no value head), `forward_batch_size`
    rows per forward pass."""
    parts = []
    with torch.no_grad():
        for rows in in_chunks(forward_batch_size, len(samples.responses)):
            ids, mask = samples.query_responses[rows], samples.attention_mask[rows]
            parts.append(response_scores(lm, ids, mask, samples.context, temperature)[0])
    return torch.cat(parts)


def reference_of(lm: Any, reference: Any) -> Any:
    """A context that yields the reference model: the frozen copy, or (LoRA, reference None) the
    same model with its adapter switched off."""
    if reference is not None:
        return contextlib.nullcontext(reference)
    if not hasattr(lm, "disable_adapter"):
        raise ValueError("a reference model is needed unless the policy is a PEFT model")

    @contextlib.contextmanager
    def adapter_off() -> Any:
        with lm.disable_adapter():
            yield lm

    return adapter_off()


@dataclass
class Evaluation:
    """Sampled responses to held-out prompts, each with its reward, (with a judge) its judge score,
    and (with_kl) its KL to the reference: the per-prompt figures behind eval.json's means."""

    prompts: list[str]
    responses: list[str]
    rewards: list[float]
    lengths: list[float]
    kls: list[float] = field(default_factory=list)
    judge: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)  # the reward's components

    def means(self) -> dict[str, float]:
        count = max(len(self.rewards), 1)
        result = {"reward": sum(self.rewards) / count, "response_length": sum(self.lengths) / count,
                  **{key: sum(values) / count for key, values in self.parts.items()}}
        if self.judge:
            result["judge"] = sum(self.judge) / count
        return {**result, "kl": sum(self.kls) / count} if self.kls else result


def evaluate_rows(lm: Any, reference: Any, tokenizer: Any, reward: RewardModel, prompts: list[Prompt],
                  generation: GenerationSection, seed: int, batch_size: int = 32, with_kl: bool = True,
                  judge: Any = None) -> Evaluation:
    """Responses sampled on held-out prompts with a fixed seed, each scored by the reward, by `judge`
    when given (anything with the reward model's `score`), and (with_kl) its per-sequence KL to the
    reference (sum over response tokens of log pi - log pi_ref). Before training the policy is the
    reference: with_kl=False skips two forwards that give 0."""
    torch.manual_seed(seed)
    result = Evaluation([p.shown for p in prompts], [], [], [])
    was_training = lm.training
    lm.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        samples = sample(lm, tokenizer, [p.policy_text for p in chunk], generation)
        raw, _ = scores_of(reward, chunk, samples, None)
        result.responses += samples.texts
        result.rewards += raw.tolist()
        for key, values in getattr(reward, "parts", {}).items():
            result.parts.setdefault(key, []).extend(values)
        result.lengths += samples.response_mask.sum(1).tolist()
        if judge is not None:
            result.judge += judge.score(chunk, samples.texts).tolist()
        if with_kl:
            logprobs = lm_logprobs(lm, samples, generation.temperature)
            with reference_of(lm, reference) as ref:
                ref_logprobs = lm_logprobs(ref, samples, generation.temperature)
            result.kls += ((logprobs - ref_logprobs) * samples.response_mask).sum(1).tolist()
    lm.train(was_training)
    return result


def evaluate(lm: Any, reference: Any, tokenizer: Any, reward: RewardModel, prompts: list[Prompt],
             generation: GenerationSection, seed: int, batch_size: int = 32, with_kl: bool = True) -> dict[str, float]:
    """Mean reward (and KL, response length) of sampled responses on held-out prompts (evaluate_rows)."""
    return evaluate_rows(lm, reference, tokenizer, reward, prompts, generation, seed, batch_size, with_kl).means()
