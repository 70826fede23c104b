"""PPO's policy forward + backward with the LM head on every position (as before) against the
response positions only (logits_to_keep, as tunekit's PPO does now), interleaved in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo_head.py

A Qwen2-shaped policy with a value head (2 layers, 128 wide, 32k vocabulary), 8 rows of 192 query +
64 response tokens, one thread; median of 6 interleaved runs each. Checks the log-probs agree.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # not bench/: bench/peft.py would shadow peft

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from tunekit.rl.ppo_model import PolicyWithValue  # noqa: E402
from tunekit.rl.rollout import last_logits, response_logprobs  # noqa: E402

BATCH, QUERY, RESPONSE = 8, 192, 64


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = PolicyWithValue(Qwen2ForCausalLM(config)).eval()
    ids = torch.randint(0, 32000, (BATCH, QUERY + RESPONSE))
    mask = torch.ones_like(ids)

    def step(keep: int) -> torch.Tensor:
        logits, values = model(ids, mask, keep=keep)
        logprobs = response_logprobs(last_logits(logits, RESPONSE) / 0.7, ids[:, QUERY:], 1.0)
        (logprobs.sum() + values.sum()).backward()
        model.zero_grad()
        return logprobs.detach()

    assert torch.allclose(step(0), step(RESPONSE + 1), atol=1e-5)
    times: dict[int, list[float]] = {0: [], RESPONSE + 1: []}
    for _ in range(6):
        for keep in times:
            start = time.perf_counter()
            step(keep)
            times[keep].append(time.perf_counter() - start)
    every, response = (statistics.median(times[k]) for k in times)
    print(f"LM head on all {QUERY + RESPONSE} positions: {every * 1e3:.0f} ms; on the last {RESPONSE + 1}: "
          f"{response * 1e3:.0f} ms; ratio {every / response:.2f}")


if __name__ == "__main__":
    main()
