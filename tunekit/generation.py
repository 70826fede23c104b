"""Sampling responses from a causal LM run (or any model id/folder) with its chat template:
what `tunekit generate` samples with (tunekit/scoring.py) and `tunekit chat` (a terminal REPL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from tunekit.config import Recipe, Section, validate_section
from tunekit.console import library_output_to_stderr
from tunekit.errors import UserError
from tunekit.jsontypes import JsonObject
from tunekit.runs.reading import open_run


def load_chat_model(target: str, command: str) -> tuple[Any, Any, JsonObject]:
    """Model, tokenizer and the run's `generation:` settings, from a run folder (model/ or adapter/)
    or from any model id/folder (with default settings). `command` names the caller in errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.data.chat import ensure_chat_template
    from tunekit.models import SAVED_MODEL, load_run_model, resolve_model_path
    from tunekit.runs.folder import read_run_config

    path = Path(target)
    settings: JsonObject = {}
    run = open_run(target, command, "causal_lm")
    if run is not None and run.method is not None:
        settings = dict(read_run_config(path).get("generation") or {})
        model, tokenizer = load_run_model(path, AutoModelForCausalLM)
    else:
        name = resolve_model_path(target)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **SAVED_MODEL)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise UserError(f"{target}: not a tunekit run and not a loadable model ({str(err).splitlines()[0]})") from None
    ensure_chat_template(tokenizer)
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    return model.eval(), tokenizer, settings


class GenerationSection(Section):
    max_new_tokens: int = Field(128, gt=0, description="longest response")
    temperature: float = Field(0.7, ge=0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass")
    seed: int = Field(0, description="sampling seed")


class ChatRecipe(Recipe):
    """A recipe that trains a causal LM to answer: its `generation:` settings travel with the run
    (`tunekit generate`, `chat` and `serve` sample with them)."""

    generation: GenerationSection = GenerationSection()


def sampling_options(settings: GenerationSection) -> JsonObject:
    """generate()'s keywords for sampling exactly `temperature` and `top_p`, nothing else: top_k=0
    and neutral penalties are stated, so neither transformers' default (top_k=50) nor a model's
    generation_config reshapes the distribution (PPO's log-probs must measure the one sampled)."""
    if settings.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0,
            "typical_p": 1.0, "repetition_penalty": 1.0}


def generate_ids(model: Any, tokenizer: Any, ids: Any, mask: Any, settings: GenerationSection) -> Any:
    """The new token ids after each left-padded row of `ids` (the one place tunekit calls generate)."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **sampling_options(settings))
    return out[:, ids.shape[1] :]


def generate(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], settings: GenerationSection,
             batch_size: int = 16) -> list[JsonObject]:
    """One response per conversation: text, whether it ended by itself (EOS), and its length."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return continue_texts(model, tokenizer, texts, settings, batch_size)


def continue_texts(model: Any, tokenizer: Any, texts: list[str], settings: GenerationSection,
                   batch_size: int = 16) -> list[JsonObject]:
    """One response per prompt text (already rendered: special tokens are not added), in left-padded
    batches, up to its first EOS: text, whether it ended by itself, and its length. Sampling draws
    from settings.seed, so the same texts in the same batches give the same responses."""
    import torch

    torch.manual_seed(settings.seed)
    results = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        for row in generate_ids(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings).tolist():
            stopped = tokenizer.eos_token_id in row
            tokens = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            results.append({
                "response": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "stopped": stopped,
                "new_tokens": len(tokens),
            })
    return results


def settings_with(settings: JsonObject, **overrides: Any) -> GenerationSection:
    """The run's generation settings with the command-line values that were given."""
    merged = {k: v for k, v in settings.items() if k in GenerationSection.model_fields}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return validate_section(GenerationSection, merged, "generation")


def chat_loop(run: str, system: str | None) -> None:
    """`tunekit chat`: a terminal REPL (/reset clears the history, /exit or Ctrl-D quits)."""
    with library_output_to_stderr():
        model, tokenizer, settings = load_chat_model(run, "chat")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, [history], settings_with(settings))[0]["response"]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
