"""Recipes: a YAML file plus `--set` overrides, turned into one typed, validated config object.

Every problem is reported as one line that names the recipe file and the dotted key, with a
"did you mean" where one fits, before any model is loaded.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from tunekit.errors import UserError, shown_key
from tunekit.train_section import TrainSection, resolve_train

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class YamlLoader(yaml.SafeLoader):
    """YAML as ML users write it: `1e-4` (no dot) is a float, and only true/false are booleans
    (YAML 1.1 reads `save_strategy: no` as False)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass

class Section(BaseModel):
    """A recipe section: unknown keys are errors, values are checked against the field types."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class ModelSection(Section):
    name: str | None = Field(None, description="Hub id, local folder, or `package:<python package>` holding a model")
    config: dict[str, Any] | None = Field(
        None, description="build a randomly initialised model from this config (over `name`'s config, if given)")
    tokenizer: str | None = Field(None, description="tokenizer to load, when it differs from `name`")
    chat_template: str | None = Field(
        None, description="`tunekit` for tunekit's template, or a Jinja template; default: the tokenizer's own")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = float32 for trained weights, bfloat16 for an adapter's frozen "
        "base on GPUs that support it")
    trust_remote_code: bool = Field(False, description="run code shipped with the model (off: it is code from the Hub)")
    revision: str | None = Field(None, description="branch, tag or commit of a Hub model")
    hub_kernels: bool = Field(
        False, description="let transformers swap layers for kernels it downloads from the Hub (its `use_kernels`, on "
        "by default since 5.25: on a GPU offline the model then fails to load); off: the model's own layers")

    @field_validator("name")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must name a model (Hub id, folder or package:NAME)")
        return value

    @model_validator(mode="after")
    def _name_or_config(self) -> ModelSection:
        if self.name is None and not (self.config or {}).get("model_type"):
            raise ValueError("give model.name (pretrained weights) or model.config with a model_type (random init)")
        return self


class PeftSection(Section):
    method: Literal["none", "lora", "dora", "ia3"] = Field(
        "none", description="none = full fine-tuning; lora; dora (weight-decomposed LoRA); ia3 (learned rescaling)")
    r: int = Field(16, gt=0, description="LoRA/DoRA rank")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    target_modules: list[str] | str | None = Field(
        None, description="modules to adapt; default all-linear for LoRA/DoRA, PEFT's per-architecture list for IA3")
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base in 4-bit NF4 or 8-bit through bitsandbytes")
    learning_rate: float | None = Field(
        None, gt=0, description="replaces train.learning_rate when an adapter is on (adapters want a larger step)")

    @model_validator(mode="after")
    def _quantize_needs_an_adapter(self) -> PeftSection:
        if self.quantize != "none" and self.method == "none":
            raise ValueError("peft.quantize needs an adapter to train (a quantised base is frozen); set peft.method: lora")
        return self


class Recipe(Section):
    """What every method's config shares. A method subclasses it and adds its own sections."""

    method: str | None = Field(None, description="the command this recipe is for (lets `tunekit lora` run it)")
    description: str = Field("", description="one line shown by `tunekit recipes`")
    output_dir: str | None = Field(None, description="run folder; default runs/<command>-<recipe name>")
    model: ModelSection
    peft: PeftSection = PeftSection()
    train: dict[str, Any] = Field(default_factory=dict, description="TrainingArguments fields, passed through")

    _source: str = PrivateAttr("")
    _args: Any = PrivateAttr(None)

    @property
    def source(self) -> str:
        """The recipe file this config was read from."""
        return self._source

    @property
    def args(self) -> Any:
        """The typed training arguments (the method's TrainingArguments or TRL config), built once from
        the checked and defaulted `train:` section. Code reads `config.args.x`; `train:` itself stays
        what config.yaml shows."""
        if self._args is None:
            self._args = self.build_args()
        return self._args

    def build_args(self) -> Any:
        from tunekit.upstream import fsdp_on_cpu

        fsdp_on_cpu()  # before accelerate's state is set up by the arguments
        try:
            # output_dir: the run folder, set when the run starts
            shared = {key: getattr(self.data, key) for key in self.train_section.from_data}  # type: ignore[attr-defined]
            return self.train_args_class()(**self.train, **shared)
        except (ValueError, TypeError) as err:
            raise UserError(f"{self.source}: train: {str(err).splitlines()[0]}") from None

    train_section: ClassVar[TrainSection]  # what this method's `train:` is; set by every method

    @classmethod
    def train_args_class(cls) -> type:
        """The TrainingArguments-like dataclass that `train:` is checked against and built as."""
        return cls.train_section.arguments()


# ---------------------------------------------------------------------------------------------
# Finding and reading recipes


def find_recipe(recipe: str) -> Path:
    """A path to a YAML file, or the name of a recipe shipped in recipes/ (with or without folder)."""
    path = Path(recipe)
    if path.is_dir():
        raise UserError(f"{recipe}: is a directory; give a recipe YAML file")
    if path.is_file():
        return path
    name = recipe.removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_recipes()
    matches = [p for key, p in shipped.items() if key == name or key.split("/")[-1] == name]
    if len(matches) == 1:
        return matches[0]
    hint = difflib.get_close_matches(name, list(shipped), n=1)
    suggestion = f"; did you mean {hint[0]}?" if hint else "; `tunekit recipes` lists the shipped ones"
    raise UserError(f"{recipe}: no such recipe file{suggestion}")


def shipped_recipes() -> dict[str, Path]:
    """`folder/name` -> path for every training recipe under recipes/ (accelerate configs and eval
    tasks, which are not recipes, excluded)."""
    if not RECIPES_DIR.is_dir():
        return {}
    return {
        str(p.relative_to(RECIPES_DIR).with_suffix("")): p
        for p in sorted(RECIPES_DIR.rglob("*.yaml"))
        if p.parent.name not in ("accelerate", "eval")
    }


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        raise UserError(f"{path}: the recipe is empty; it needs at least a `model:` section")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (model:, data:, train:), got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `--set a.b.c=value`; the value is parsed as YAML (so 3e-5, true, [a, b] work)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise UserError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. --set train.learning_rate=3e-5")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"--set {override!r}: the value is not valid YAML; quote it") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise UserError(f"--set {override!r}: {where} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Validation


def load_config(cls: type[Recipe], recipe: str, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate: the one way a method gets its config."""
    path, data = read_recipe(recipe, overrides)
    return validate_config(cls, data, str(path))


def read_recipe(recipe: str, overrides: list[str] = ()) -> tuple[Path, dict[str, Any]]:
    """A recipe's file and its mapping with the `--set` overrides applied (not validated yet)."""
    path = find_recipe(recipe)
    data = read_yaml_mapping(path)
    for override in overrides:
        apply_override(data, override)
    return path, data


# Old spellings that are still read, moved with a note: old dotted key -> its one home now.
MOVED_KEYS = {"train.max_length": "data.max_length"}


def move_old_keys(cls: type[Recipe], data: dict[str, Any], source: str) -> None:
    """Keys a recipe may still spell the old way, moved to where they live now (with a note on stderr)."""
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section, target = data.get(old_section), data.get(new_section)
        if not (isinstance(section, dict) and old_key in section and isinstance(target, dict)):
            continue
        if new_key not in fields_at(cls, [new_section]):
            continue  # a method without that key: the key check names the mistake
        if new_key in target:
            raise UserError(f"{source}: {old}: also set as {new}; keep only {new}")
        target[new_key] = section.pop(old_key)
        print(f"tunekit: note: {source}: {old} is now written {new}; read from there for this run", file=sys.stderr)


def validate_config(cls: type[Recipe], data: dict[str, Any], source: str) -> Recipe:
    move_old_keys(cls, data, source)
    try:
        config = cls.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(cls, err, source)) from None
    config.train = resolve_train(cls.train_section, cls.train_args_class(), config.train, source)
    if config.peft.method != "none" and config.peft.learning_rate is not None:
        config.train = {**config.train, "learning_rate": config.peft.learning_rate}
    config._source = source
    return config


def load_run_config(cls: type[Recipe], run_dir: Path) -> Recipe:
    """A run's saved config.yaml read back as its method's config, validated like any recipe: the
    one way a finished run's settings are read."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a tunekit run folder (no config.yaml)")
    return validate_config(cls, read_yaml_mapping(path), str(path))


def validate_section(cls: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Any typed section from YAML (an eval task, ...), with the same one-line errors as recipes."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(cls, err, source)) from None


def format_validation_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    # A misspelled key also makes the real one "missing": name the misspelling, it is the cause.
    first = min(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    loc = [str(p) for p in first["loc"]]
    key = ".".join(shown_key(p) for p in loc) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        known = fields_at(cls, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        suggestion = f"did you mean {hint[0]}?" if hint else f"known keys: {', '.join(known)}"
        return f"{source}: {key}: unknown key; {suggestion}"
    if kind == "missing":
        return f"{source}: {key}: required key is missing"
    message = first["msg"].removeprefix("Value error, ")
    if kind in ("model_type", "dict_type"):
        message = "expected a mapping (a section with keys)"
    shown = first.get("input")
    got = "" if kind.startswith("value_error") or isinstance(shown, dict) else f" (got {shown!r})"
    if not loc and kind.startswith("value_error"):  # a rule across sections: its message names the keys
        return f"{source}: {message}"
    return f"{source}: {key}: {message}{got}"


def fields_at(cls: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the section at `loc` (for "did you mean")."""
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def to_yaml(config: Recipe) -> str:
    """The resolved config as YAML (what actually ran), for config.yaml and --dry-run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
