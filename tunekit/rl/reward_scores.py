"""Scoring texts with a reward model: the one way tunekit tokenises a text for a reward model, used
when `tunekit reward` trains one and when PPO, GRPO and RLOO score policy responses with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.data.preference import DEFAULT_MAX_LENGTH


def encode(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """Token ids of one text to score: the tokenizer's EOS appended when it has one (the causal-LM
    head reads the last token), its own special tokens otherwise ([CLS] ... [SEP] for BERT); a long
    text keeps its end, where the response to judge is."""
    eos = tokenizer.eos_token
    if eos is not None and not text.endswith(eos):
        text += eos
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def score_ids(model: Any, pad_token_id: int, ids: list[list[int]], batch_size: int = 32,
              positive: int | None = None) -> list[float]:
    """The reward of each token sequence, batched by length (right padding), in input order: the
    one output of a reward model, or (`positive`, a classifier) the probability of that class."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = [0.0] * len(ids)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            column = logits[:, 0] if positive is None else logits.float().softmax(-1)[:, positive]
            for i, value in zip(chunk, column.float().cpu().tolist()):
                scores[i] = value
    model.train(was_training)
    return scores


def score_texts(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32,
                max_length: int = DEFAULT_MAX_LENGTH, positive: int | None = None) -> list[float]:
    """The reward model's score of each text (prompt and response together, as one string), or a
    classifier's probability of class `positive`."""
    ids = [encode(tokenizer, text, max_length) for text in texts]
    return score_ids(model, tokenizer.pad_token_id, ids, batch_size, positive)


def reward_max_length(run_dir: Path) -> int:
    """The tokens per text a reward run trained with: its saved `data.max_length` (`train.max_length`
    in runs saved before that key moved)."""
    from tunekit.runs.folder import read_run_config

    saved = read_run_config(run_dir)
    old = (saved.get("train") or {}).get("max_length")
    return int(old or (saved.get("data") or {}).get("max_length", DEFAULT_MAX_LENGTH))


class RunScorer:
    """A `tunekit reward` or `tunekit classify` run's model and tokenizer, scoring prompt + response
    texts: a reward model's one output, or (`positive`) a classifier's probability of that class."""

    def __init__(self, run_dir: str, batch_size: int = 32, positive: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification

        from tunekit.models import load_run_model

        path = Path(run_dir)
        self.model, self.tokenizer = load_run_model(path, AutoModelForSequenceClassification)
        self.model.eval().requires_grad_(False)
        self.batch_size, self.positive = batch_size, positive
        # Texts are cut where the run cut them in training (as `predict` does).
        self.max_length = reward_max_length(path)

    def to(self, device: Any) -> RunScorer:
        self.model.to(device)
        return self

    def score(self, prompts: list[Any], responses: list[str]) -> Any:
        """A float32 tensor: the score of each prompt (a rollout Prompt) with its response."""
        import torch

        texts = [p.reward_text(self.tokenizer, r) for p, r in zip(prompts, responses)]
        scores = score_texts(self.model, self.tokenizer, texts, self.batch_size, self.max_length, self.positive)
        return torch.tensor(scores, dtype=torch.float32)
