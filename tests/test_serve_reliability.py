"""Server defects found in review (issue 26), one test each: every test failed on the code before its
fix. The data, RL and distributed ones are in tests/test_reliability.py."""

from __future__ import annotations

import json

import pytest

KEY = "sekret"


@pytest.fixture(scope="module")
def tiny(tiny_gpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_gpt).eval(), AutoTokenizer.from_pretrained(tiny_gpt)


@pytest.fixture(scope="module")
def server(tiny_gpt):
    from tunekit.serving.server import background

    with background(str(tiny_gpt), api_key=KEY, model_id="tiny") as (url, engine):
        yield url, engine


def until(condition, seconds=30):
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def ended(events):
    return bool(events) and (events[-1].finish_reason is not None or events[-1].error is not None)


def raw_http(url, head: str, body: bytes = b"", seconds: float = 10) -> tuple[int, bytes]:
    """Send a request by hand (headers as given, then the body); the status and the reply."""
    import socket
    from urllib.parse import urlparse

    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=seconds) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < 10:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            reply += part
    return int(reply.split()[1]), reply


def post(url, body: dict, key=KEY):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_bad_seed_is_a_400_and_a_worker_error_fails_only_its_own_request(server, tiny):
    from tunekit.serving.batching import BatchDecoder, Job, Sampling

    url, _ = server
    for seed, n in ((2**64, 1), (2**64 - 1, 2), (-(2**63) - 1, 1)):
        status, body = post(url, {"model": "tiny", "prompt": "To be", "max_tokens": 2, "seed": seed, "n": n})
        assert status == 400 and body["error"]["param"] == "seed", body
    assert post(url, {"model": "tiny", "prompt": "To be", "max_tokens": 2, "seed": 2**63 - 1, "n": 2})[0] == 200
    model, tokenizer = tiny
    engine = BatchDecoder(model, tokenizer)
    bad, good = [], []
    ids = tokenizer("To be")["input_ids"]
    engine.submit(Job(ids, 2, Sampling(max_tokens=4, temperature=1.0, top_p=1.0, seed=2**64 - 1), bad.append))
    engine.submit(Job(ids, 1, Sampling(max_tokens=4, temperature=0, top_p=1.0), good.append))
    engine.start()  # both queued first: one batch
    assert until(lambda: ended(bad) and ended(good))
    engine.close()
    assert bad[-1].error is not None
    assert good[-1].error is None and good[-1].finish_reason in ("stop", "length")


def test_the_key_is_checked_before_the_body_is_read_and_the_body_is_capped(server):
    url, engine = server
    path = url.split("127.0.0.1:")[1].split("/", 1)[1]
    head = f"POST /{path}/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # A huge declared body that never comes: 401 from the headers alone (it used to wait for the body).
    status, _ = raw_http(url, head + "Content-Length: 1000000000\r\n", seconds=5)
    assert status == 401
    status, reply = raw_http(url, head + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000000000\r\n", seconds=5)
    assert status == 413 and b"larger than" in reply
    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(24)) + b"0\r\n\r\n"
    status, _ = raw_http(url, head + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n", chunked)
    assert status == 413
    for stop in (["a", "b", "c", "d", "e"], ["x" * 200]):
        status, body = post(url, {"model": "tiny", "prompt": "To be", "max_tokens": 2, "stop": stop})
        assert status == 400 and body["error"]["param"] == "stop", body
    status, body = post(url, {"model": "tiny", "prompt": ["To be"] * 65, "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "n"
    assert post(url, {"model": "tiny", "prompt": "To be", "max_tokens": 2, "stop": ["\n\n"]})[0] == 200


def test_nucleus_sampling_never_picks_a_token_outside_the_nucleus(monkeypatch):
    import torch

    from tunekit.serving.batching import Job, Row, Sampling, choose_tokens

    torch.manual_seed(0)
    logits = torch.randn(128, 5000) * 3
    top_p = [0.9 if i % 2 else 1.0 for i in range(len(logits))]
    rows = [Row(Job([1], 1, Sampling(max_tokens=1, temperature=1.0, top_p=p), print), 0, None) for p in top_p]
    largest_below_one = torch.tensor(1.0).nextafter(torch.tensor(0.0))  # the largest draw torch.rand gives
    monkeypatch.setattr(torch, "rand", lambda *a, **k: largest_below_one.clone())
    chosen = torch.tensor(choose_tokens(logits, rows))
    assert not (chosen == logits.argmin(-1)).any()
    probs = logits.double().softmax(-1)
    sorted_p = probs.sort(-1, descending=True).values
    nucleus = ((sorted_p.cumsum(-1) - sorted_p) < torch.tensor(top_p, dtype=torch.double)[:, None]).sum(-1)
    ranks = (probs > probs.gather(1, chosen[:, None])).sum(-1)
    assert (ranks < nucleus).all()


class Chain:
    """Emit target of request i of a chain: at its 8th event it sends request i + 1 (from the worker
    thread, between two steps), so each joins the running batch while the one before it runs."""

    def __init__(self, engine, ids, length, events, jobs, released):
        self.engine, self.ids, self.length = engine, ids, length
        self.events, self.jobs, self.released = events, jobs, released
        self.mine: list = []

    def send(self):
        import weakref

        from tunekit.serving.batching import Job, Sampling

        target = Chain(self.engine, self.ids, self.length, self.events, self.jobs, self.released)
        self.events.append(target.mine)
        self.released.append(weakref.ref(target))  # the request's reply, as the server holds it
        tokens = 400 if len(self.events) == self.length else 16
        self.jobs[:] = [Job(self.ids, 1, Sampling(max_tokens=tokens, temperature=0, top_p=1.0), target)]
        self.engine.submit(self.jobs[0])  # the test holds only the newest job

    def __call__(self, event):
        self.mine.append(event)
        if len(self.mine) == 8 and len(self.events) < self.length:
            self.send()


def test_a_running_batch_trims_padding_columns_and_lets_finished_jobs_go(tiny):
    import gc

    from tunekit.serving.batching import BatchDecoder

    model, tokenizer = tiny
    engine = BatchDecoder(model, tokenizer, wait_s=0).start()
    ids = tokenizer("Friends, Romans")["input_ids"]
    events, jobs, released = [], [], []
    Chain(engine, ids, 31, events, jobs, released).send()  # 31 requests of 16 tokens, 2 rows at a time
    assert until(lambda: len(events) == 31 and len(events[-1]) >= 8)
    assert all(e[-1].finish_reason == "length" for e in events[:-1])
    assert engine.stats["largest_batch"] == 2 and engine.stats["batches"] == 31 and engine.stats["joins"] == 30
    gc.collect()
    assert [i for i, ref in enumerate(released[:29]) if ref() is not None] == []  # finished requests let go
    assert engine.stats["widest"] <= len(ids) + 2 * 16, engine.stats  # 31 x 8+ columns without trimming
    jobs[-1].cancel()
    engine.close()
    # every forward pass but the prefills is a decoding step, filed under its rows (1 or 2 here)
    assert sum(engine.decode_steps.values()) == engine.stats["steps"] - engine.stats["batches"]
    assert set(engine.decode_steps) == {1, 2} and set(engine.decode_seconds) == {1, 2}
    assert sum(engine.decode_seconds.values()) < engine.stats["step_seconds"]


def test_a_non_streaming_client_that_disconnects_stops_its_generation(server):
    import socket
    import time
    from urllib.parse import urlparse

    url, engine = server
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 400, "temperature": 0}
    assert post(url, body)[1]["choices"][0]["finish_reason"] == "length"  # runs the whole way when nobody leaves
    before = dict(engine.stats)
    address = urlparse(url)
    data = json.dumps(body).encode()
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(f"POST {address.path}/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        assert until(lambda: engine.stats["tokens"] - before["tokens"] >= 5)
    left = time.monotonic()
    assert until(lambda: engine.stats["rows_cancelled"] > before["rows_cancelled"], seconds=5)
    assert time.monotonic() - left < 1 and engine.stats["tokens"] - before["tokens"] < 400
