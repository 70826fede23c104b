"""Sampling responses from a causal LM run (or any model id/folder) with its chat template:
`tunekit generate` (one prompt or a file of them) and `tunekit chat` (a terminal REPL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tunekit.errors import UserError
from tunekit.masking import prompts_of_file
from tunekit.outputs import write_atomic
from tunekit.runner import library_output_to_stderr
from tunekit.runs import open_run


def load_chat_model(target: str, command: str) -> tuple[Any, Any, dict[str, Any]]:
    """Model, tokenizer and the run's `generation:` settings, from a run folder (model/ or adapter/)
    or from any model id/folder (with default settings). `command` names the caller in errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.chat import ensure_chat_template
    from tunekit.models import load_run_model, resolve_model_path
    from tunekit.outputs import read_run_config

    path = Path(target)
    settings: dict[str, Any] = {}
    run = open_run(target, command, "causal_lm")
    if run is not None and run.method is not None:
        settings = dict(read_run_config(path).get("generation") or {})
        model, tokenizer = load_run_model(path, AutoModelForCausalLM)
    else:
        name = resolve_model_path(target)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
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


def generate_for(
    run: str, prompts: list[str] | None, data: str | None, heldout: int | None, out: Path | None, **overrides: Any,
) -> Path | list[str]:
    """`tunekit generate`: the responses to --prompt messages (returned), or to every prompt of a
    file / the run's held-out split (written as JSON lines to `out`, whose path is returned)."""
    if not prompts and not data and not heldout:
        raise UserError("give --prompt TEXT, --data FILE or --heldout N")
    run_info = open_run(run, "generate", "causal_lm")
    if heldout and (run_info is None or run_info.method != "sft"):
        kind = f"a run of `tunekit {run_info.method}`" if run_info and run_info.method else "not a tunekit run"
        raise UserError(f"{run}: {kind}; --heldout reads the held-out split of an sft run; use --prompt or --data")
    with library_output_to_stderr():
        if heldout:
            from tunekit.methods.sft import heldout_prompts

            conversations = heldout_prompts(Path(run), heldout)
        elif data:
            conversations = prompts_of_file(data)
        else:
            conversations = [[{"role": "user", "content": p}] for p in prompts or []]
        model, tokenizer, settings = load_chat_model(run, "generate")
        results = generate(model, tokenizer, conversations, **settings_with(settings, **overrides))
    if not data and not heldout:
        return [result["response"] for result in results]
    out = out or Path(run) / "generations.jsonl"
    rows = [{"prompt": c[-1]["content"], **r} for c, r in zip(conversations, results)]
    write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    stopped = sum(r["stopped"] for r in results)
    print(f"{stopped} of {len(results)} responses ended by themselves (EOS)", file=sys.stderr, flush=True)
    return out


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
        reply = generate(model, tokenizer, [history], **settings_with(settings))[0]["response"]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
