"""Start `tunekit serve MODEL` on a free port, ask it one question through the official `openai`
client (once whole, once streamed), print both answers and stop the server. Exit 1 when the server
does not start or an answer is empty or the two differ (greedy decoding: they must agree).

    python examples/ask_openai.py runs/lora-smollm2-arith-grpo/merged "A farmer has 48 apples ..."
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import openai


def start(model: str) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, read from the line it prints once it listens."""
    command = [sys.executable, "-m", "tunekit", "serve", model, "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    for line in server.stderr:
        found = re.search(r"(http://\S+/v1)", line)
        if found:  # the server's later log lines are passed on, so its pipe never fills and blocks it
            threading.Thread(target=lambda: sys.stderr.writelines(server.stderr), daemon=True).start()
            return server, found.group(1)
        if time.monotonic() > deadline:
            break
    server.kill()
    sys.exit(f"ask_openai: `{' '.join(command)}` did not start (exit code {server.wait()})")


def main() -> None:
    model, question = sys.argv[1], sys.argv[2]
    server, url = start(model)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused")
        name = client.models.list().data[0].id
        messages = [{"role": "user", "content": question}]
        whole = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=64)
        answer = whole.choices[0].message.content
        stream = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=64, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{url} ({name})\n  asked: {question}\n  answer: {answer}\n  streamed: {streamed}")
    if not answer or answer != streamed:
        sys.exit("ask_openai: the answer is empty, or the streamed answer differs from the whole one")


if __name__ == "__main__":
    main()
