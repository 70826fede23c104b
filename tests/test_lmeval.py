"""LM evaluation: log-likelihood scoring equals the model's own forward pass; K-shot prompts hold
exactly K distinct demonstrations, never the query; several models compare in one command."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import ROOT, SHARED, write

from tunekit.lmeval import Task, build_prompt, continuation_logprobs, demonstrations, load_task


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_gpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_gpt).eval(), AutoTokenizer.from_pretrained(tiny_gpt)


def test_batched_loglikelihood_equals_a_manual_forward_pass(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = [("To be, or not to be", " that is the question"), ("Now is the winter", " of our discontent made glorious"),
             ("Friends, Romans", " countrymen"), ("A", " horse! a horse! my kingdom for a horse!")]
    batched = continuation_logprobs(model, tokenizer, pairs, batch_size=4)  # one padded batch
    for (context, continuation), (score, count) in zip(pairs, batched):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        assert count == len(cont) > 1 or continuation == " countrymen"
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
        expected = sum(torch.log_softmax(logits[len(ctx) - 1 + j].double(), -1)[token].item() for j, token in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-5)


def test_k_shot_prompts_hold_k_distinct_demonstrations_and_never_the_query(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    task = Task(kind="multiple_choice", data="x", template="Review: {sentence}\nSentiment:",
                verbalizer={"0": " negative", "1": " positive"}, shots=3)
    pool = [{"sentence": f"sentence number {i}", "label": str(i % 2)} for i in range(10)]
    rng = random.Random(0)
    for query in pool:
        demos = demonstrations(task, pool, query, rng)
        prompt = build_prompt(task, tokenizer, query, demos, lambda d: task.verbalizer[d["label"]])
        shown = [row for row in pool if f"Review: {row['sentence']}\n" in prompt]
        assert len(demos) == 3 and len({d["sentence"] for d in demos}) == 3
        assert len(shown) == 4 and query in shown  # 3 demonstrations + the query itself, once
        assert prompt.endswith(f"Review: {query['sentence']}\nSentiment:")
        assert prompt.count(query["sentence"] + "\n") == 1


def test_every_shipped_task_loads():
    for path in sorted((ROOT / "recipes" / "eval").glob("*.yaml")):
        assert path.read_text().startswith("# tunekit eval ")
        load_task(str(path))


def test_compare_two_models_on_a_task(tmp_path, cli, tiny_gpt):
    task = write(tmp_path / "t.yaml", f"""\
kind: multiple_choice
data: {SHARED}/sst2/dev.tsv
limit: 12
template: "Review: {{sentence}}\\nSentiment:"
verbalizer: {{"0": " negative", "1": " positive"}}
shots: 2
pool: {SHARED}/sst2/train.tsv
""")
    ppl = write(tmp_path / "p.yaml", f"kind: perplexity\ndata: {SHARED}/tiny_shakespeare/input.txt\nlimit: 3\nblock_size: 64\n")
    result = cli("eval", tiny_gpt, tiny_gpt, "--task", task, "--task", ppl, "--out", tmp_path / "r.json")
    assert result.code == 0, result.err
    results = json.loads(result.last_line)
    metrics = results[str(tiny_gpt)]
    assert metrics["t"]["examples"] == 12 and 0 <= metrics["t"]["accuracy"] <= 1
    assert metrics["p"]["perplexity"] > 1 and metrics["p"]["bits_per_byte"] > 0
    assert "t accuracy" in result.err and "p perplexity" in result.err
    assert json.loads((tmp_path / "r.json").read_text()) == results


def test_bad_task_is_exit_2(tmp_path, cli, tiny_gpt):
    task = write(tmp_path / "t.yaml", "kind: multiple_choice\ndata: x.tsv\n")
    result = cli("eval", tiny_gpt, "--task", task)
    assert result.code == 2 and "multiple_choice needs choices" in result.err
