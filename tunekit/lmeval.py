"""`tunekit eval MODEL... --task TASK.yaml`: judging a causal LM the GPT-2/GPT-3 way, on tasks it
was never trained on: perplexity of a text, multiple choice by log-likelihood, and generation with
a scorer; zero-shot or with K demonstrations in the prompt (in-context learning).

Generation is greedy (temperature: 0, the default) or sampled (temperature, top_p, `samples` per
prompt, from `seed`). A generate task reports its scorer's mean, `<scorer>_se` and `examples`:
each prompt's score is the mean over its samples, and the standard error is taken over the n
prompts, sqrt(mean((s_i - mean)^2) / n), which for one 0/1 score per prompt is sqrt(p(1-p)/n). The
K samples of one prompt are not independent draws of the benchmark (they share the question), so n
is the number of prompts, never n x K. The `exact_answer` scorer is the reward function of the same
name (tunekit.rl.rewards): the text after the last `marker`, or with no marker the last number of
the response, against the row's `answer_column`; a task and an RL run measure accuracy the same way.
"""

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
from tunekit.rl.rewards import exact_answer


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
    scorer: Literal["exact_match", "contains", "f1", "exact_answer"] = Field(
        "f1", description="generate: how an answer is scored (against target; exact_answer: against answer_column)")
    marker: str | None = Field(
        None, description="exact_answer: the answer is the text after the last marker (e.g. 'The answer is'); "
                          "null: the last number in the response")
    answer_column: str = Field("answer", description="exact_answer: the row's column that holds the answer")
    max_new_tokens: int = Field(64, gt=0, description="generate: longest answer")
    temperature: float = Field(0.0, ge=0, description="generate: 0 = greedy (the default); above 0: sampled")
    top_p: float = Field(1.0, gt=0, le=1, description="generate, sampled: nucleus mass (1 = the full distribution)")
    samples: int = Field(1, ge=1, description="generate: responses per prompt (sampled); a prompt scores their mean")
    shots: int = Field(0, ge=0, description="demonstrations placed before each query")
    pool: str | None = Field(None, description="file the demonstrations are drawn from (default: data)")
    seed: int = Field(0, description="seed of the demonstration draw and of sampling")
    separator: str = Field("\n\n", description="between demonstrations and query")
    chat: bool = Field(False, description="demonstrations as prior chat turns, through the chat template")
    block_size: int = Field(256, gt=1, description="perplexity: tokens per scored window")
    batch_size: int = Field(64, gt=0, description="generate: prompts answered together (a larger batch spreads "
                                                  "each decoding step's fixed cost over more rows; memory grows)")

    @model_validator(mode="after")
    def _choices_for_multiple_choice(self) -> Task:
        if self.kind == "multiple_choice" and not (self.choices or self.verbalizer):
            raise ValueError("multiple_choice needs choices: [...] or verbalizer: {label: text}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"samples: {self.samples} greedy answers would all be the same; set temperature above 0")
        if self.scorer != "exact_answer" and (self.marker is not None or self.answer_column != "answer"):
            raise ValueError(f"marker and answer_column are arguments of scorer exact_answer, not of {self.scorer}")
        return self


def load_task(path: str) -> Task:
    """A task file, checked; for exact_answer, also that its rows have the answer column."""
    task = validate_section(Task, read_yaml_mapping(Path(path)), path)
    if task.kind == "generate" and task.scorer == "exact_answer":
        first = next(iter(read_table(task.data, "task.data").rows), {})
        if task.answer_column not in first:
            raise UserError(f"{path}: answer_column: {task.data} has no column {task.answer_column!r} (it has "
                            f"{', '.join(first)}); set answer_column to the one with the answers")
    return task


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
    """Each prompt answered `samples` times (greedy or sampled), each answer scored, a prompt's score
    their mean; the mean over prompts and its standard error (module docstring)."""
    from tunekit.runs.metrics import mean_and_se

    prompts = [build_prompt(task, tokenizer, row, demonstrations(task, pool, row, rng), lambda d: " " + fill(task.target, d, "pool")) for row in rows]
    outputs = generate_raw(model, tokenizer, [p for p in prompts for _ in range(task.samples)], task)
    scores = score_answers(task, [row for row in rows for _ in range(task.samples)], outputs)
    per_prompt = [sum(scores[i : i + task.samples]) / task.samples for i in range(0, len(scores), task.samples)]
    mean, se = mean_and_se(per_prompt)
    return {task.scorer: mean, f"{task.scorer}_se": se, "examples": len(rows), "samples": task.samples}


def score_answers(task: Task, rows: list[Row], answers: list[str]) -> list[float]:
    """One score per answer, by the task's scorer, against the row it answers."""
    from tunekit.runs.metrics import squad_exact_match, squad_f1

    if task.scorer == "exact_answer":
        return exact_answer(answers, rows, task.answer_column, task.marker)
    scores = []
    for row, answer in zip(rows, answers):
        reference = fill(task.target, row, "data")
        if task.scorer == "exact_match":
            scores.append(float(squad_exact_match(answer, [reference])))
        elif task.scorer == "contains":
            scores.append(float(reference.strip().lower() in answer.lower()))
        else:
            scores.append(squad_f1(answer, [reference]))
    return scores


def generate_raw(model: Any, tokenizer: Any, prompts: list[str], task: Task) -> list[str]:
    """Continuations of rendered prompts in left-padded batches, greedy or sampled as the task says,
    each cut at EOS. A plain-text prompt's continuation is cut at its first blank line too (the
    model would go on with another demonstration); a chat turn ends at EOS only, so a chat model's
    answer keeps its paragraphs."""
    from tunekit.generation import GenerationSection, continue_texts

    if tokenizer.pad_token is None:  # a batch needs one; masked out, so any token will do
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    settings = GenerationSection(max_new_tokens=task.max_new_tokens, temperature=task.temperature, top_p=task.top_p,
                                 seed=task.seed)
    responses = [r["response"] for r in continue_texts(model, tokenizer, prompts, settings, task.batch_size)]
    return responses if task.chat else [r.split("\n\n")[0].strip() for r in responses]


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

    headline = ("accuracy", "f1", "exact_match", "contains", "exact_answer", "perplexity")
    rows = []
    for model, by_task in results.items():
        row: Row = {"model": model}
        for name, metrics in by_task.items():
            key = next(k for k in headline if k in metrics)
            row[f"{name} {key}"] = metrics[key]
            if f"{key}_se" in metrics:
                row[f"{name} {key}_se"] = metrics[f"{key}_se"]
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return table(rows, columns)
