"""Sampling responses from a causal LM run (or any model id/folder) with its chat template:
`tunekit generate` (one prompt or a file of them) and `tunekit chat` (a terminal REPL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.errors import UserError


def load_chat_model(target: str) -> tuple[Any, Any, dict[str, Any]]:
    """Model, tokenizer and the run's `generation:` settings, from a run folder (model/ or adapter/)
    or from any model id/folder (with default settings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.chat import ensure_chat_template
    from tunekit.models import load_run_model, resolve_model_path
    from tunekit.outputs import read_run_config

    path = Path(target)
    settings: dict[str, Any] = {}
    if (path / "run.json").is_file():
        settings = dict(read_run_config(path).get("generation") or {})
        model, tokenizer = load_run_model(path, AutoModelForCausalLM)
    else:
        name = resolve_model_path(target)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise UserError(f"{target}: not a tunekit run and not a loadable model ({str(err).splitlines()[0]})") from None
    ensure_chat_template(tokenizer)
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    return model.eval(), tokenizer, settings


def generate(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int = 128,
    temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, batch_size: int = 16,
) -> list[dict[str, Any]]:
    """One response per conversation: text, whether it ended by itself (EOS), and its length."""
    import torch

    torch.manual_seed(seed)
    results = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            stopped = tokenizer.eos_token_id in row
            tokens = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            results.append({
                "response": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "stopped": stopped,
                "new_tokens": len(tokens),
            })
    return results


def settings_with(settings: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The run's generation settings with the command-line values that were given."""
    merged = {k: v for k, v in settings.items() if k in ("max_new_tokens", "temperature", "top_p", "seed")}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return merged
