"""`tunekit eval MODEL... --task TASK.yaml`: judging a causal LM the GPT-2/GPT-3 way, on tasks it
was never trained on: perplexity of a text, multiple choice by log-likelihood, and generation with
a scorer; zero-shot or with K demonstrations in the prompt (in-context learning)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tunekit.config import Section, read_yaml_mapping, validate_section
from tunekit.data.tables import read_table
from tunekit.errors import UserError
from tunekit.jsontypes import Row


class Task(Section):
    kind: Literal["perplexity", "multiple_choice", "generate"] = Field(description="what is measured")
    description: str = Field("", description="one line for listings")
    data: str = Field(description="evaluation file (text for perplexity; rows otherwise)")
    skip: int = Field(0, ge=0, description="leave out the first N rows (e.g. those a model was trained on)")
    limit: int | None = Field(None, gt=0, description="use N rows (after skip)")
    template: str = Field("{text}", description="prompt, with {column} placeholders")
    choices: list[str] | None = Field(None, description="multiple_choice: the answers, in label order")
    verbalizer: dict[str, str] | None = Field(None, description="multiple_choice: label value -> answer text")
    label_column: str = Field("label", description="multiple_choice: the gold label column")
    target: str = Field("{output}", description="generate: the reference answer, with {column} placeholders")
    scorer: Literal["exact_match", "contains", "f1"] = Field("f1", description="generate: how an answer is scored")
    max_new_tokens: int = Field(64, gt=0, description="generate: longest answer")
    shots: int = Field(0, ge=0, description="demonstrations placed before each query")
    pool: str | None = Field(None, description="file the demonstrations are drawn from (default: data)")
    seed: int = Field(0, description="seed of the demonstration draw")
    separator: str = Field("\n\n", description="between demonstrations and query")
    chat: bool = Field(False, description="demonstrations as prior chat turns, through the chat template")
    block_size: int = Field(256, gt=1, description="perplexity: tokens per scored window")

    @model_validator(mode="after")
    def _choices_for_multiple_choice(self) -> Task:
        if self.kind == "multiple_choice" and not (self.choices or self.verbalizer):
            raise ValueError("multiple_choice needs choices: [...] or verbalizer: {label: text}")
        return self


def load_task(path: str) -> Task:
    return validate_section(Task, read_yaml_mapping(Path(path)), path)


def fill(template: str, row: Row, where: str) -> str:
    try:
        return template.format(**row)
    except KeyError as err:
        raise UserError(f"{where}: the template names column {err.args[0]!r}, which the row lacks") from None


def answer_texts(task: Task) -> tuple[list[str], dict[str, int]]:
    """The answer strings and label value -> index."""
    if task.verbalizer:
        keys = list(task.verbalizer)
        return [task.verbalizer[k] for k in keys], {str(k): i for i, k in enumerate(keys)}
    return list(task.choices), {str(i): i for i in range(len(task.choices))} | {c.strip(): i for i, c in enumerate(task.choices)}


def demonstrations(task: Task, pool: list[dict], query: dict, rng: random.Random) -> list[dict]:
    """K distinct rows of the pool, none of them the query."""
    candidates = [row for row in pool if row != query]
    if len(candidates) < task.shots:
        raise UserError(f"{task.pool or task.data}: {len(candidates)} rows, fewer than shots: {task.shots}")
    return rng.sample(candidates, task.shots)


def build_prompt(task: Task, tokenizer: Any, query: dict, demos: list[dict], answer_of: Any) -> str:
    """The query after its demonstrations, in plain text or as chat turns."""
    if task.chat:
        messages = []
        for demo in demos:
            messages += [{"role": "user", "content": fill(task.template, demo, "pool")},
                         {"role": "assistant", "content": answer_of(demo).strip()}]
        messages.append({"role": "user", "content": fill(task.template, query, "data")})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shown = [fill(task.template, demo, "pool") + answer_of(demo) for demo in demos]
    return task.separator.join([*shown, fill(task.template, query, "data")])


def continuation_logprobs(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[tuple[float, int]]:
    """Sum of log-probabilities of each continuation given its context, and its token count.
    Contexts and continuations are tokenised apart (the continuation's tokens are exactly its own);
    many pairs go through one padded forward pass."""
    import torch

    encoded = []
    for context, continuation in pairs:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        encoded.append((ctx, cont))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        rows = [c + k for c, k in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.inference_mode():
            logprobs = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.double().log_softmax(-1).cpu()
        for i, (ctx, cont) in enumerate(chunk):
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            results.append((logprobs[i, positions, torch.tensor(cont)].sum().item(), len(cont)))
    return results


def run_task(model: Any, tokenizer: Any, task: Task) -> dict[str, float]:
    if task.kind == "perplexity":
        return perplexity(model, tokenizer, task)
    # Task files are small (a benchmark's dev set): held as rows, since every query draws from the pool.
    rows = list(read_table(task.data, "task.data").rows[task.skip :][: task.limit])
    pool = list(read_table(task.pool, "task.pool").rows) if task.pool else list(read_table(task.data, "task.data").rows)
    rng = random.Random(task.seed)
    if task.kind == "multiple_choice":
        return multiple_choice(model, tokenizer, task, rows, pool, rng)
    return generation_task(model, tokenizer, task, rows, pool, rng)


def multiple_choice(model: Any, tokenizer: Any, task: Task, rows: list, pool: list, rng: random.Random) -> dict[str, float]:
    answers, index = answer_texts(task)

    def gold(row: dict) -> int:
        label = str(row.get(task.label_column)).strip()
        if label not in index:
            raise UserError(f"{task.data}: label {label!r} has no answer text (choices/verbalizer)")
        return index[label]

    prompts = [build_prompt(task, tokenizer, row, demonstrations(task, pool, row, rng), lambda d: answers[gold(d)]) for row in rows]
    scores = continuation_logprobs(model, tokenizer, [(p, a) for p in prompts for a in answers])
    correct = correct_norm = 0
    for i, row in enumerate(rows):
        options = scores[i * len(answers) : (i + 1) * len(answers)]
        by_sum = max(range(len(answers)), key=lambda j: options[j][0])
        by_char = max(range(len(answers)), key=lambda j: options[j][0] / max(len(answers[j]), 1))
        correct += by_sum == gold(row)
        correct_norm += by_char == gold(row)
    return {"accuracy": correct / len(rows), "accuracy_norm": correct_norm / len(rows), "examples": len(rows)}


def generation_task(model: Any, tokenizer: Any, task: Task, rows: list, pool: list, rng: random.Random) -> dict[str, float]:
    from tunekit.runs.metrics import squad_exact_match, squad_f1

    prompts = [build_prompt(task, tokenizer, row, demonstrations(task, pool, row, rng), lambda d: " " + fill(task.target, d, "pool")) for row in rows]
    tokenizer.padding_side = "left"
    outputs = generate_raw(model, tokenizer, prompts, task.max_new_tokens)
    scores = []
    for row, answer in zip(rows, outputs):
        reference = fill(task.target, row, "data")
        if task.scorer == "exact_match":
            scores.append(float(squad_exact_match(answer, [reference])))
        elif task.scorer == "contains":
            scores.append(float(reference.strip().lower() in answer.lower()))
        else:
            scores.append(squad_f1(answer, [reference]))
    return {task.scorer: sum(scores) / len(scores), "examples": len(rows)}


def generate_raw(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of plain-text prompts, cut at EOS or the first blank line."""
    import torch

    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1] :]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).split("\n\n")[0].strip())
    return answers


def perplexity(model: Any, tokenizer: Any, task: Task) -> dict[str, float]:
    """Token-level loss over a text in non-overlapping windows, perplexity, and bits per byte."""
    import torch

    text = "\n".join(row.get("text", "") for row in read_table(task.data, "task.data").rows)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + task.block_size] for i in range(0, len(ids), task.block_size)]
    windows = windows[: task.limit] if task.limit else windows
    total, count = 0.0, 0
    for window in windows:
        if len(window) < 2:
            continue
        tensor = torch.tensor([window], device=model.device)
        with torch.inference_mode():
            loss = model(input_ids=tensor, labels=tensor).loss.item()
        total += loss * (len(window) - 1)
        count += len(window) - 1
    scored_bytes = len(tokenizer.decode([t for w in windows for t in w[1:]]).encode("utf-8"))
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": total / math.log(2) / max(scored_bytes, 1),
            "tokens": count}


def compare(targets: list[str], task_paths: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {task: metrics}} for every model and task (tasks checked before any model loads)."""
    from tunekit.generation import load_chat_model

    tasks = {Path(p).stem: load_task(p) for p in task_paths}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for target in targets:
        model, tokenizer, _ = load_chat_model(target, "eval --task")
        tokenizer.padding_side = "right"
        results[target] = {name: run_task(model, tokenizer, task) for name, task in tasks.items()}
    return results


def evaluate_tasks(targets: list[str], task_paths: list[str], out: Path | None) -> dict[str, dict[str, dict[str, float]]]:
    """`tunekit eval --task`: every model on every task; the table goes to stderr, every result
    to `out` (one JSON file) when given."""
    import sys

    from tunekit.console import library_output_to_stderr
    from tunekit.files import write_json

    with library_output_to_stderr():
        results = compare(targets, task_paths)
    print(table_of(results), file=sys.stderr, flush=True)
    if out:
        write_json(out, results)
    return results


def table_of(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Models as rows, each task's headline metric as a column."""
    from tunekit.runs.inventory import table

    headline = ("accuracy", "f1", "exact_match", "contains", "perplexity")
    rows = []
    for model, by_task in results.items():
        row: Row = {"model": model}
        for name, metrics in by_task.items():
            key = next(k for k in headline if k in metrics)
            row[f"{name} {key}"] = metrics[key]
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return table(rows, columns)
