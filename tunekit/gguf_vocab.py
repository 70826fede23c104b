"""A byte-level BPE tokenizer as GGUF metadata (llama.cpp's "gpt2" tokenizer model), and the Ollama
Modelfile that goes beside an exported file. Used by `tunekit export` (tunekit/export.py).

A GGUF carries no tokenizer.json: the reader rebuilds the tokenizer from the vocabulary, the merges,
the type of every token, the special ids and the name of the pre-tokenizer, the one piece of code it
cannot read from the file. llama.cpp knows pre-tokenizers by name, so the name must be one whose
splitting is what the tokenizer's own pre-tokenizer does, or the same text gets other ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tunekit.data.chat import CHAT_TEMPLATE, END, ROLE_TOKENS
from tunekit.errors import UserError

# token types, as llama.cpp numbers them (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# TRL's markers of the assistant's tokens in tunekit's template: training-only, they render to
# nothing, and llama.cpp's template engine does not know the tag.
GENERATION_TAGS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


@dataclass(frozen=True)
class Vocab:
    """What a GGUF says about the tokenizer, in token-id order."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str  # llama.cpp's name of the pre-tokenizer
    special: dict[str, int]  # bos / eos / unk / pad -> token id, where the tokenizer has one
    add_bos: bool
    chat_template: str | None


def read_vocab(tokenizer: Any, vocab_size: int, source: str) -> Vocab:
    """The tokenizer as GGUF fields, padded to the model's `vocab_size` embedding rows."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{source}: a {model.get('type')} tokenizer; `tunekit export` writes byte-level BPE vocabularies only")
    if spec.get("normalizer") is not None:
        raise UserError(f"{source}: the tokenizer normalises text ({spec['normalizer'].get('type')}), "
                        "which llama.cpp's byte-level BPE does not do; `tunekit export` cannot keep its ids")
    by_id: dict[int, tuple[str, int]] = {index: (token, NORMAL) for token, index in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = (added["content"], CONTROL if added["special"] else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise UserError(f"{source}: the tokenizer has token id {max(by_id)}, but the model has only {vocab_size} "
                        "embedding rows; the tokenizer belongs to another model")
    # rows the tokenizer never produces get a placeholder name, as llama.cpp's converter writes them
    entries = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    return Vocab(
        tokens=[token for token, _ in entries], types=[kind for _, kind in entries], merges=merges,
        pre=pre_tokenizer_name(spec.get("pre_tokenizer"), source), special=special_ids(tokenizer),
        add_bos=adds_bos(tokenizer), chat_template=GENERATION_TAGS.sub("", template) if template else None,
    )


def pre_tokenizer_name(pre: dict[str, Any] | None, source: str) -> str:
    """llama.cpp's name for what the tokenizer's pre-tokenizer does. Only the byte-level ones whose
    splitting llama.cpp reproduces exactly are named; anything else would tokenise differently there."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space"):
        if kinds == ["ByteLevel"]:
            return "gpt-2"  # the GPT-2 pattern alone (tunekit's own tokenizer)
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"  # each digit alone, then the GPT-2 pattern (SmolLM, SmolLM2)
    raise UserError(f"{source}: a pre-tokenizer of {' + '.join(map(str, kinds)) or 'none'}; `tunekit export` knows "
                    "byte-level BPE with the GPT-2 pattern (gpt-2) and with digits split first (smollm)")


def special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    return {name: index for name, index in ids.items() if index is not None}


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding puts the BOS token in front (llama.cpp adds it only where the file says so)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > len(tokenizer("a", add_special_tokens=False).input_ids) and ids[0] == tokenizer.bos_token_id


def write_vocab(writer: Any, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, index in vocab.special.items():
        adders[name](index)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# tunekit's own chat format (tunekit/data/chat.py) in Ollama's Go template language: Ollama turns the
# Jinja templates it recognises (ChatML and the other common ones) into its own, but not this one.
TUNEKIT_OLLAMA_TEMPLATE = """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""


def modelfile(gguf_name: str, vocab: Vocab) -> str:
    """An Ollama Modelfile for the exported file: where it is, the tokens that end a reply (the EOS
    and every special token the chat template writes: a model that starts a new turn is done), and a
    TEMPLATE only where Ollama cannot take the chat template from the file itself."""
    template = vocab.chat_template or ""
    eos = vocab.tokens[vocab.special["eos"]] if "eos" in vocab.special else None
    tunekit_format = template == GENERATION_TAGS.sub("", CHAT_TEMPLATE) and eos == END
    # tunekit's template writes its role tokens from the role's name, so they are not in its text
    marked = ROLE_TOKENS if tunekit_format else [t for t, kind in zip(vocab.tokens, vocab.types) if kind == CONTROL and t in template]
    stops = list(dict.fromkeys([*([eos] if eos else []), *marked]))
    lines = [f"# Ollama: ollama create NAME -f {gguf_name.removesuffix('.gguf')}.Modelfile", f"FROM ./{gguf_name}"]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    if tunekit_format:
        lines.append(f'TEMPLATE """{TUNEKIT_OLLAMA_TEMPLATE}"""')
    return "\n".join(lines) + "\n"
