"""How tunekit asks transformers for a model: the model's own layers unless a recipe asks for Hub kernels."""

from __future__ import annotations

import pytest

from tunekit.config import ModelSection
from tunekit.errors import UserError


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every AutoModelForCausalLM.from_pretrained call (which still loads)."""
    from transformers import AutoModelForCausalLM

    seen: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    return seen


def test_a_recipe_model_loads_without_hub_kernels_unless_asked(tiny_gpt, calls):
    """transformers >= 5.25 turns `use_kernels` on by default, which on a GPU fetches layers from the Hub
    (and fails offline): tunekit passes it off, and on with model.hub_kernels."""
    from transformers import AutoModelForCausalLM

    from tunekit.models import load_pretrained

    load_pretrained(AutoModelForCausalLM, ModelSection(name=str(tiny_gpt)))
    load_pretrained(AutoModelForCausalLM, ModelSection(name=str(tiny_gpt), hub_kernels=True))
    assert [c["use_kernels"] for c in calls] == [False, True]
    assert all(c["use_safetensors"] for c in calls)


def test_saved_models_load_without_hub_kernels(tiny_gpt, calls):
    from tunekit.generation import load_chat_model

    load_chat_model(str(tiny_gpt), "tunekit eval")
    assert calls and all(c["use_kernels"] is False and c["use_safetensors"] for c in calls)


def test_a_named_model_that_fails_to_load_names_model_name(tiny_gpt, monkeypatch):
    """A ValueError from from_pretrained (as the Hub-kernel fetch raises offline) is about model.name,
    not model.config, when the recipe gives no config."""
    from transformers import AutoModelForCausalLM

    from tunekit.models import load_pretrained

    def refuse(*args, **kwargs):
        raise ValueError("Version 2 of 'kernels-community/rotary' is not available in the local cache\nmore")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(UserError) as info:
        load_pretrained(AutoModelForCausalLM, ModelSection(name=str(tiny_gpt)))
    assert str(info.value).startswith(f"model.name: cannot load {str(tiny_gpt)!r}: Version 2 of")
    assert "\n" not in str(info.value)
