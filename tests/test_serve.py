"""`tunekit serve`: a server on a free loopback port over a tiny SFT run, spoken to with the official
`openai` client (chat, completions, streaming, n, stop, seed, errors, API key, disconnects)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import ROOT, SHARED, write

from tunekit.serving.server import background

PROMPT = "Name a colour."


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_gpt):
    """A 6-step SFT run of the tiny model on Alpaca: a real run folder (run.json, config.yaml, model/)."""
    from tunekit.cli import main

    tmp = tmp_path_factory.mktemp("serve")
    recipe = write(tmp / "sft.yaml", f"""\
method: sft
model:
  name: {tiny_gpt}
data:
  train: {SHARED / "alpaca" / "alpaca_data_1k.json"}
  train_limit: 32
  eval_size: 4
train:
  max_steps: 6
  per_device_train_batch_size: 4
  learning_rate: 3.0e-3
  save_strategy: "no"
""")
    with pytest.raises(SystemExit) as done:
        main(["sft", str(recipe), "-o", str(tmp / "run")])
        raise SystemExit(0)
    assert done.value.code in (0, None)
    return tmp / "run"


@pytest.fixture(scope="module")
def server(sft_run):
    with background(str(sft_run)) as (url, engine):
        yield url, engine


def client(url, key="unused"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def chat(url, prompt=PROMPT, **kwargs):
    kwargs = {"model": "run", "temperature": 0, "max_tokens": 12, **kwargs}
    return client(url).chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)


def test_stop_sequences_are_held_back_until_they_cannot_match():
    from tunekit.serving.batching import first_stop, held_back

    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("xyz",)) == 0
    assert held_back("caf\ufffd", ()) == 1
    assert first_stop("a, b. c.", (".", ", b"), 0) == 1
    assert first_stop("abc", ("x",), 0) is None


@pytest.fixture(scope="module")
def tiny(tiny_gpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_gpt).eval(), AutoTokenizer.from_pretrained(tiny_gpt)


def until(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def greedy(engine, prompts, max_tokens=10):
    """Submit one greedy job per prompt; returns their event lists (filled by the worker)."""
    from tunekit.serving.batching import Job, Sampling

    events = [[] for _ in prompts]
    for ids, out in zip(prompts, events):
        engine.submit(Job(ids, 1, Sampling(max_tokens=max_tokens, temperature=0, top_p=1.0), out.append))
    return events


def text(events):
    return "".join(e.text for e in events)


def done(events):
    return bool(events) and events[-1].finish_reason is not None


def test_batched_rows_decode_as_they_do_alone(tiny):
    """Left padding and position ids are right: prompts of different lengths decoded in one batch
    give the greedy tokens each gives alone."""
    from tunekit.serving.batching import BatchDecoder

    model, tokenizer = tiny
    prompts = [tokenizer(t)["input_ids"] for t in ("To be", "Friends, Romans, countrymen, lend me", "O")]
    engine = BatchDecoder(model, tokenizer)
    together = greedy(engine, prompts)  # queued before the worker starts: one batch
    engine.start()
    assert until(lambda: all(map(done, together)))
    assert engine.stats["batches"] == 1 and engine.stats["largest_batch"] == 3
    alone = [greedy(engine, [p]) for p in prompts]
    assert until(lambda: all(done(a[0]) for a in alone))
    engine.close()
    assert [text(t) for t in together] == [text(a[0]) for a in alone]


def test_a_request_that_arrives_mid_batch_joins_it(tiny):
    """A short request sent while a long one decodes joins its batch (and is not held up by it),
    and decodes as it does alone."""
    from tunekit.serving.batching import BatchDecoder

    model, tokenizer = tiny
    short, long = tokenizer("Friends, Romans, countrymen")["input_ids"], tokenizer("To be")["input_ids"]
    engine = BatchDecoder(model, tokenizer, wait_s=0).start()
    running = greedy(engine, [long], max_tokens=100)[0]
    assert until(lambda: len(running) >= 3)
    joined = greedy(engine, [short])[0]
    assert until(lambda: done(joined))
    assert not done(running) and engine.stats["joins"] == 1 and engine.stats["largest_batch"] == 2
    assert until(lambda: done(running)) and running[-1].finish_reason == "length" and running[-1].tokens == 100
    alone = greedy(engine, [short])[0]
    assert until(lambda: done(alone))
    engine.close()
    assert text(joined) == text(alone)


def test_models_and_greedy_chat_equal_tunekit_generate(server, cli, sft_run):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == ["run"]
    reply = chat(url)
    choice = reply.choices[0]
    generated = cli("generate", sft_run, "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0")
    assert generated.code == 0, generated.err
    assert choice.message.role == "assistant"
    assert choice.message.content.strip() == generated.out.strip()  # generate strips the response
    assert reply.usage.prompt_tokens > 5 and 1 <= reply.usage.completion_tokens <= 12
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")


def test_completion_with_stop_sequence(server):
    url, _ = server
    text_of = client(url).completions.create
    full = text_of(model="run", prompt="To be, or not to be", max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and len(text) >= 8, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text_of(model="run", prompt="To be, or not to be", max_tokens=24, temperature=0, stop=[stop, "\x00never"])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streaming_gives_the_same_text_and_usage(server):
    url, _ = server
    whole = chat(url, max_tokens=20)
    chunks = list(chat(url, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len(chunks) > 3  # text came in pieces, not at the end


def test_n_choices_with_a_seed_repeat(server):
    url, _ = server
    first = chat(url, n=2, temperature=1.0, seed=7, max_tokens=16)
    again = chat(url, n=2, temperature=1.0, seed=7, max_tokens=16)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]  # each choice samples with its own generator
    assert first.usage.completion_tokens <= 32


def test_concurrent_requests_share_batches_and_all_complete(server):
    url, engine = server
    engine.stats["largest_batch"] = 0
    prompts = [f"Tell me about number {i}." for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: chat(url, prompt=p, max_tokens=8), prompts))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert engine.stats["largest_batch"] >= 2  # some were decoded together


def post(url, body: bytes, headers=None):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, _ = server
    with pytest.raises(openai.NotFoundError) as err:
        chat(url, model="gpt-4")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client(url).chat.completions.create(model="run", messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        chat(url, max_tokens=-1)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        chat(url, prompt="to be or not " * 400)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        chat(url, logprobs=True)
    status, body = post(f"{url}/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(f"{url}/nowhere", b"{}")
    assert status == 404 and "error" in body
    assert chat(url, max_tokens=3).choices[0].finish_reason in ("stop", "length")


def test_a_client_that_disconnects_stops_its_generation(server):
    url, engine = server
    long = chat(url, max_tokens=400)
    assert long.choices[0].finish_reason == "length"  # this prompt runs the whole way when nobody leaves
    before = dict(engine.stats)
    stream = chat(url, max_tokens=400, stream=True)
    chunks = iter(stream)
    assert all(next(chunks).choices[0].finish_reason is None for _ in range(4))  # it has started generating
    stream.close()
    deadline = time.monotonic() + 20
    while engine.stats["rows_cancelled"] == before["rows_cancelled"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats["rows_cancelled"] == before["rows_cancelled"] + 1
    assert 3 <= engine.stats["tokens"] - before["tokens"] < 400


def test_api_key_is_required_when_set(tiny_gpt):
    with background(str(tiny_gpt), api_key="sekret", model_id="tiny") as (url, _):
        for key in ("unused", "sekret-not"):
            with pytest.raises(openai.AuthenticationError):
                client(url, key).models.list()
        reply = client(url, "sekret").completions.create(model="tiny", prompt="To be", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens <= 3


def test_cli_serves_until_interrupted_with_the_key_from_the_environment(tiny_gpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEKIT_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "tunekit", "serve", str(tiny_gpt), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("tunekit serve: http://127.0.0.1:"):
                break
        url = lines[-1].split()[2]
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
        assert [m.id for m in client(url, "from-env").models.list().data] == [tiny_gpt.name]
        client(url, "from-env").completions.create(model=tiny_gpt.name, prompt="secret words", max_tokens=2)
    finally:
        proc.send_signal(2)
        proc.wait(timeout=20)
    log = proc.stderr.read()
    assert proc.returncode == 130 and "Traceback" not in log  # Ctrl-C: tunekit's exit code for an interrupt
    assert "prompt tokens" in log and "secret words" not in log  # counts only, unless --log-prompts


def test_serve_refuses_what_it_cannot_load(cli, tmp_path):
    result = cli("serve", tmp_path / "nothing", "--port", "0")
    assert result.code == 2 and result.err.count("\n") == 1, result.err
