"""The run folder's README.md: a model card the Hugging Face Hub reads (YAML metadata on top: library,
base model, tags, datasets, pipeline) and a person reads (what was trained on what, the metrics,
the command that reproduces it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tunekit.data.tables import hub_dataset_name
from tunekit.jsontypes import JsonObject, Metrics

PIPELINE_TAGS = {  # the model head a run trained -> the Hub's pipeline (its widget and search filter)
    "causal-lm": "text-generation",
    "masked-lm": "fill-mask",
    "sequence-classification": "text-classification",
    "question-answering": "question-answering",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # `name` or `owner/name`; not "last 200 rows"


def hub_model_id(name: str | None) -> str | None:
    """`name` where it is a Hub model id; None for a local folder, a packaged model, a random init."""
    if not name or name.startswith("package:") or Path(name).exists() or not HUB_ID.fullmatch(name):
        return None
    return name


def metadata(info: JsonObject, task: str, peft_method: str | None, adapter: bool) -> JsonObject:
    """The card's front matter, in the keys of the Hub's model-card metadata."""
    specs = [s for key in ("train_data", "eval_data") for s in as_list(info.get(key))]
    datasets = list(dict.fromkeys(name for s in specs if (name := hub_dataset_name(s)) and HUB_ID.fullmatch(name)))
    tags = ["tunekit", info.get("method", "")] + ([peft_method] if peft_method else [])
    meta: JsonObject = {"library_name": "peft" if adapter else "transformers"}
    if base := hub_model_id(info.get("base_model")):
        meta["base_model"] = base
    meta["tags"] = [t for t in tags if t]
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = PIPELINE_TAGS[task]
    return meta


def as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def model_card(info: JsonObject, metrics: Metrics, task: str, peft_method: str | None, adapter: bool) -> str:
    front = yaml.safe_dump(metadata(info, task, peft_method, adapter), sort_keys=False, allow_unicode=True)
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
                     if not isinstance(v, list | dict))  # samples stay in eval.json
    trainable, total = info.get("trainable_params", 0), info.get("total_params", 0)
    share = f" ({100 * trainable / total:.2f}%)" if total else ""
    return f"""---
{front}---

# {info.get("method", "tunekit")} run

Fine-tuned with tunekit `{info.get("method")}`{f" ({peft_method} adapter)" if peft_method else ""}.

- **Base model:** `{info.get("base_model")}`
- **Training data:** `{info.get("train_data")}` ({info.get("train_rows", "?")} rows)
- **Evaluation data:** `{info.get("eval_data")}` ({info.get("eval_rows", "?")} rows)
- **Parameters:** {trainable:,} trainable of {total:,}{share}
- **Effective batch size:** {info.get("effective_batch_size")} (per device x processes x accumulation)
- **Processes:** {info.get("num_processes", 1)}; engine {info.get("engine", "single")}, sharded: {info.get("sharding", "none")}
- **Wall time:** {info.get("wall_time_s")} s

## Metrics

| metric | value |
|---|---|
{rows}

## Reproduce

```
{info.get("command")}
```

The resolved recipe is in `config.yaml`; training curves in `loss.png`{" and `reward.png`" if info.get("method") == "rlhf" else ""}
and `metrics.jsonl`.
{exports_section(info.get("exports") or [])}"""


EXPORTS_HEADING = "\n## Exports\n"


def exports_section(exports: list[dict[str, Any]]) -> str:
    """The files `tunekit export` wrote from this run (empty when none)."""
    if not exports:
        return ""
    rows = "\n".join(f"| `{e['file']}` | {e['format']} | {e['type']} | {e['bytes']:,} | {e['at']} |" for e in exports)
    return f"""{EXPORTS_HEADING}
Written by `tunekit export` (GGUF: llama.cpp, Ollama with the `.Modelfile` beside it, LM Studio).

| file | format | type | bytes | written |
|---|---|---|---|---|
{rows}
"""


def with_exports(card: str, exports: list[dict[str, Any]]) -> str:
    """The card with its Exports section (the last one) replaced by one listing `exports`."""
    head = card.split(EXPORTS_HEADING, 1)[0].rstrip("\n") + "\n"
    return head + exports_section(exports)
