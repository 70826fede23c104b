"""tunekit's chat format: special tokens, a training-compatible chat template, and the byte-level BPE
tokenizer that `tunekit pretrain` trains when a recipe names none."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

END = "<|end|>"  # end of a turn and of a document; the tokenizer's EOS, so generation stops on it
PAD = "<|pad|>"
MASK = "<|mask|>"  # for masked-LM pre-training of encoders
ROLES = ("system", "user", "assistant", "tool")
ROLE_TOKENS = [f"<|{role}|>" for role in ROLES]

# Every turn is `<|role|>\n content EOS \n`. The assistant's content and its EOS sit inside the
# {% generation %} markers, so TRL's assistant_only_loss trains the model to stop as well.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, with tunekit's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END, PAD, MASK, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=END, bos_token=END, pad_token=PAD, mask_token=MASK,
        additional_special_tokens=ROLE_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def ensure_chat_template(tokenizer: Any, wanted: str | None = None) -> None:
    """Set the chat template a recipe asks for; a tokenizer without one gets tunekit's (roles as
    plain text, EOS ends each turn)."""
    from tunekit.errors import UserError

    if tokenizer.eos_token is None:
        raise UserError("model.tokenizer: the tokenizer has no EOS token, so a response could never end; use a causal LM's tokenizer")
    if wanted == "tunekit" or (wanted is None and not getattr(tokenizer, "chat_template", None)):
        tokenizer.chat_template = CHAT_TEMPLATE
    elif wanted is not None:
        tokenizer.chat_template = wanted
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
