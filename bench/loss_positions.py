"""Share of the positions of tunekit's packed SFT batches that carry no loss (prompt tokens, the
first token of each packed sequence, padding), for which the LM head computes logits anyway.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/loss_positions.py DATA_FILE [MAX_LENGTH]

Tokens from a BPE tokenizer (8k) trained on the file's first 2,000 conversations; packed and
collated exactly as `tunekit sft` does with packing on (sft.packed, sft.PackedRows), batch 8.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # not bench/: bench/peft.py would shadow peft

from tunekit.config import validate_config  # noqa: E402
from tunekit.data.chat import train_tokenizer  # noqa: E402
from tunekit.methods import sft  # noqa: E402


def main() -> None:
    data, max_length = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    config = validate_config(sft.Config, {"model": {"config": {"model_type": "llama"}},
                                          "data": {"train": data, "max_length": max_length},
                                          "train": {"packing": True}}, "loss_positions")
    split = sft.check(config).train
    tokenizer = train_tokenizer([m["content"] for c, _ in split.examples(2000) for m in c], 8000)
    rows = sft.packed(sft.tokenize_split(tokenizer, split, config).dataset, max_length)
    collate = sft.PackedRows(tokenizer.pad_token_id)
    total = trained = 0
    for start in range(0, len(rows), 8):
        labels = collate([rows[i] for i in range(start, min(start + 8, len(rows)))])["labels"]
        total += labels.numel()
        trained += int((labels != -100).sum())
    print(f"{data}: {len(split)} conversations, max_length {max_length}: {trained:,} of {total:,} positions "
          f"carry loss; {1 - trained / total:.1%} of the LM head's positions do not")


if __name__ == "__main__":
    main()
