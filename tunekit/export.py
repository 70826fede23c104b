"""`tunekit export RUN --format gguf`: a fine-tuned Llama-architecture decoder as one GGUF file for
llama.cpp, Ollama and LM Studio, written with the `gguf` package alone (no llama.cpp checkout).

What a reader needs and a naive writer gets wrong: llama.cpp's tensor names; the rows of the q and k
projections reordered for llama.cpp's rotary embedding (it rotates adjacent pairs of a head's
dimensions, transformers rotates its two halves); no separate output tensor when the embeddings are
tied (the reader then uses the token embeddings); the hyperparameters under llama.cpp's keys; and
the tokenizer as metadata (tunekit/gguf_vocab.py). An adapter run is merged in memory first.

The tensors are streamed: the header and tensor table are written first, then each tensor is
converted and written on its own, so memory holds the model and one converted tensor. The file is
written under a temporary name beside its place and renamed when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekit.errors import UserError
from tunekit.files import read_json, write_atomic, write_json
from tunekit.gguf_vocab import Vocab, modelfile, read_vocab, write_vocab

TYPES = ("f32", "f16", "bf16", "q8_0")
FORMATS = ("gguf",)
Q8_BLOCK = 32  # q8_0 stores blocks of 32 values of a row (34 bytes each: an f16 scale and 32 int8)


@dataclass(frozen=True)
class Source:
    """What is exported: a run folder (`run` set, with `adapter` when it saved one) or a model folder."""

    path: Path
    run: bool
    adapter: bool


def export(target: Path, fmt: str = "gguf", kind: str = "f16", out: Path | None = None, overwrite: bool = False) -> Path:
    """Write `target`'s model as a GGUF file (and its Modelfile); returns the file's path.
    Everything that can be wrong with the input is checked before the model is loaded."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown format; one of {', '.join(FORMATS)}")
    if kind not in TYPES:
        raise UserError(f"--type {kind}: unknown type; one of {', '.join(TYPES)}")
    source = check_source(target)
    out = out or target / f"{target.resolve().name}-{kind}.gguf"
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF file name ends in .gguf")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it or --out to choose another file")
    started = time.monotonic()
    config, tokenizer, weights = load_model(source)
    vocab = read_vocab(tokenizer, config.vocab_size, str(target))
    write_gguf(config, weights, vocab, kind, out, name=target.resolve().name)
    write_atomic(out.with_suffix(".Modelfile"), modelfile(out.name, vocab))
    if source.run:
        record_export(source.path, out, kind, round(time.monotonic() - started, 1))
    return out


def check_source(target: Path) -> Source:
    """A finished causal-LM run (or a model folder) of the Llama architecture, whose base model is
    there when it is an adapter."""
    from tunekit.runs.reading import open_run

    info = open_run(target, "export", "causal_lm")
    if info is None:
        raise UserError(f"{target}: no such run or model folder; `tunekit export` reads a local folder")
    folder = info.path / "adapter" if (info.method and info.adapter) else info.path / "model" if info.method else info.path
    if info.method is None and info.adapter:
        raise UserError(f"{target}: an adapter folder; export the run that trained it (its adapter is merged first)")
    config = read_config(folder / "config.json")
    if info.method and info.adapter:
        adapter = read_json(folder / "adapter_config.json")
        base = adapter.get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise UserError(f"{target}: the adapter's base model {base!r} is not there; it is merged into the "
                            "base before export: put the base model back (for models/..., run `make models`)")
    model_type = config.get("model_type")
    if model_type != "llama":
        raise UserError(f"{target}: a {model_type or 'unknown'} model ({', '.join(config.get('architectures') or [])}); "
                        "`tunekit export` writes the Llama architecture (LlamaForCausalLM: tunekit's tiny GPT, SmolLM2)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UserError(f"{target}: config {key} is true; `tunekit export` writes Llama models without biases")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{target}: rope scaling {rope.get('rope_type')!r}; `tunekit export` writes plain rope only")
    return Source(info.path, info.method is not None, info.method is not None and info.adapter)


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable model config ({err})") from None


def load_model(source: Source) -> tuple[Any, Any, Any]:
    """(config, tokenizer, weights). A saved model is read tensor by tensor from its safetensors
    files, so memory holds one tensor at a time; so is a plain LoRA run's base, each tensor merged
    as it is read. Other adapters are merged by peft on the whole model in memory (a QLoRA base is
    loaded in full precision for that)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if source.adapter:
        from tunekit.models import load_run_model

        adapter = source.path / "adapter"
        streamed = lora_merged_weights(adapter)
        if streamed is not None:
            return AutoConfig.from_pretrained(adapter), AutoTokenizer.from_pretrained(adapter), streamed
        model, tokenizer = load_run_model(source.path, AutoModelForCausalLM, quantized=False)
        model = model.merge_and_unload().eval()
        return model.config, tokenizer, ModuleWeights(model)
    folder = source.path / "model" if source.run else source.path
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights; `tunekit export` reads safetensors checkpoints")
    return AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), FolderWeights(files)


class FolderWeights:
    """A checkpoint's tensors straight from its safetensors files, each read when it is needed.
    Read with plain file reads, not a memory map: a mapped file's pages stay resident (and counted)
    until the map closes, so a mapped 540 MB checkpoint would cost 540 MB however it is walked."""

    DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def header(self, file: Path) -> tuple[int, dict[str, Any]]:
        """(where the data starts, the file's JSON table of tensors); the format is 8 bytes of
        little-endian header length, the header, then the data."""
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            table = json.loads(handle.read(size))
        table.pop("__metadata__", None)
        return 8 + size, table

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        for file in self.files:
            _, table = self.header(file)
            for key, entry in table.items():
                yield key, tuple(entry["shape"])

    def tensors(self) -> Iterator[tuple[str, Any]]:
        import torch

        for file in self.files:
            start, table = self.header(file)
            with file.open("rb") as handle:
                for key, entry in table.items():
                    if entry["dtype"] not in self.DTYPES:
                        raise UserError(f"{file}: tensor {key} is {entry['dtype']}; `tunekit export` reads F32, F16 and BF16 checkpoints")
                    begin, end = entry["data_offsets"]
                    handle.seek(start + begin)
                    data = bytearray(end - begin)
                    handle.readinto(data)
                    dtype = getattr(torch, self.DTYPES[entry["dtype"]])
                    yield key, torch.frombuffer(data, dtype=dtype).reshape(entry["shape"]) if data else torch.empty(entry["shape"], dtype=dtype)


class LoraMergedWeights(FolderWeights):
    """A LoRA run's weights merged one tensor at a time: W + scale * B @ A, the base tensor read
    from its checkpoint and the adapter's pair (a few MB, held whole) applied to it."""

    def __init__(self, files: list[Path], pairs: dict[str, tuple[Any, Any]], scale: float) -> None:
        super().__init__(files)
        self.pairs, self.scale = pairs, scale

    def tensors(self) -> Iterator[tuple[str, Any]]:
        for key, tensor in super().tensors():
            if key in self.pairs:
                down, up = self.pairs[key]
                tensor = tensor.float() + self.scale * (up.float() @ down.float())
            yield key, tensor


def lora_merged_weights(adapter: Path) -> LoraMergedWeights | None:
    """The streamed merge for a plain LoRA adapter on a safetensors base; None for anything else
    (DoRA, per-layer ranks, fully trained modules, a QLoRA-only base...), which peft merges."""
    from safetensors.torch import load_file

    config = read_json(adapter / "adapter_config.json")
    base = Path(config.get("base_model_name_or_path") or "")
    files = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    plain = (config.get("peft_type") == "LORA" and not config.get("use_dora") and not config.get("rank_pattern")
             and not config.get("alpha_pattern") and not config.get("fan_in_fan_out") and not config.get("modules_to_save"))
    if not (plain and files and (adapter / "adapter_model.safetensors").is_file()):
        return None
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(adapter / "adapter_model.safetensors").items():
        module, dot, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight"):
            return None  # something besides the low-rank pairs: let peft merge it
        pairs.setdefault(f"{module}.weight", {})[part[0]] = tensor
    rank = config["r"]
    scale = config["lora_alpha"] / (rank ** 0.5 if config.get("use_rslora") else rank)
    return LoraMergedWeights(files, {key: (pair["A"], pair["B"]) for key, pair in pairs.items()}, scale)


class ModuleWeights:
    """A model in memory (a merged adapter run): its state dict, tied weights once."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        return ((name, tuple(tensor.shape)) for name, tensor in self.model.state_dict().items())

    def tensors(self) -> Iterator[tuple[str, Any]]:
        return iter(self.model.state_dict().items())


def hyperparameters(writer: Any, config: Any, name: str, kind: str) -> None:
    """The architecture under llama.cpp's keys."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden/heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute_rows(weight: Any, heads: int) -> Any:
    """A q or k projection's rows in llama.cpp's order. transformers' rotary embedding pairs
    dimension i of a head with i + d/2; llama.cpp's pairs 2i with 2i + 1. Interleaving the two
    halves of each head's rows gives the same attention scores under llama.cpp's rotation."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str, config: Any, names: Any) -> str | None:
    """llama.cpp's name of a tensor; None for the output projection when it is the token embedding
    (tied: the reader falls back to token_embd, and a second copy would only cost space)."""
    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"{hf_name}: a tensor the Llama architecture does not have; `tunekit export` cannot place it")
    return name


def gguf_array(hf_name: str, tensor: Any, config: Any) -> Any:
    """The tensor as a float32 numpy array in llama.cpp's layout (q/k rows permuted)."""
    array = tensor.detach().float().numpy()
    if hf_name.endswith("self_attn.q_proj.weight"):
        return permute_rows(array, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return permute_rows(array, config.num_key_value_heads or config.num_attention_heads)
    return array


def stored_type(shape: tuple[int, ...], kind: str) -> str:
    """How one tensor is stored: norms (1-D) stay f32, as llama.cpp keeps them; q8_0 needs rows
    that are whole blocks, and a matrix whose rows are not falls back to f16 (as llama.cpp's does)."""
    if len(shape) < 2:
        return "f32"
    if kind == "q8_0" and shape[-1] % Q8_BLOCK:
        return "f16"
    return kind


def encode(array: Any, kind: str) -> Any:
    """The tensor's bytes in `kind` (bf16 and q8_0 come back as uint8 rows)."""
    import gguf
    import numpy as np

    if kind == "f32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if kind == "f16":
        return array.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array), {"bf16": gguf.GGMLQuantizationType.BF16,
                                                              "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind])


def tensor_info(writer: Any, name: str, shape: tuple[int, ...], kind: str) -> None:
    """Announce a tensor before any data is written (its stored size computed, not converted)."""
    import math

    import gguf
    import numpy as np

    count = math.prod(shape)
    if kind == "f32":
        writer.add_tensor_info(name, shape, np.dtype(np.float32), count * 4)
    elif kind == "f16":
        writer.add_tensor_info(name, shape, np.dtype(np.float16), count * 2)
    elif kind == "bf16":
        writer.add_tensor_info(name, shape, np.dtype(np.float32), count * 2, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        nbytes = count // Q8_BLOCK * 34
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def write_gguf(config: Any, weights: Any, vocab: Vocab, kind: str, out: Path, name: str) -> None:
    """Write the file under a temporary name beside `out`, then rename it into place."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        hyperparameters(writer, config, name, kind)
        write_vocab(writer, vocab)
        for hf_name, shape in weights.shapes():  # pass 1: the table of tensors, from shapes alone
            if (tensor_name := gguf_name(hf_name, config, names)) is not None:
                tensor_info(writer, tensor_name, shape, stored_type(shape, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, tensor in weights.tensors():  # pass 2: the data, one tensor in memory at a time
            if gguf_name(hf_name, config, names) is not None:
                writer.write_tensor_data(encode(gguf_array(hf_name, tensor, config), stored_type(tuple(tensor.shape), kind)))
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def record_export(run_dir: Path, out: Path, kind: str, seconds: float) -> None:
    """run.json's `exports` list and the model card's Exports section name the file."""
    from tunekit.runs.modelcard import with_exports

    info = read_json(run_dir / "run.json")
    entry = {"format": "gguf", "type": kind, "file": str(out), "bytes": out.stat().st_size, "seconds": seconds,
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    info["exports"] = [e for e in info.get("exports", []) if e.get("file") != str(out)] + [entry]
    write_json(run_dir / "run.json", info)
    card = run_dir / "README.md"
    if card.is_file():
        write_atomic(card, with_exports(card.read_text(encoding="utf-8"), info["exports"]))
