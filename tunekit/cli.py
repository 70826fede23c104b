"""The `tunekit` command line. Each command parses its arguments, loads the config and calls the
method's `run`; nothing else happens here. Heavy libraries are imported inside the commands, so
`tunekit --help` answers at once."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from tunekit.errors import UserError

app = typer.Typer(
    name="tunekit",
    help="Fine-tune Hugging Face models: classification, QA, pre-training, SFT, LoRA, reward models, RLHF.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=True,
)

RecipeArg = Annotated[str, typer.Argument(help="recipe YAML file, or the name of a shipped recipe (`tunekit recipes`)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a recipe key, e.g. --set train.learning_rate=3e-5 (repeatable)"),
]
OutputOpt = Annotated[str | None, typer.Option("--output-dir", "-o", help="run folder (default runs/<command>-<recipe>)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing run folder")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="check recipe and data, print the resolved config, load no model")]
RunArg = Annotated[Path, typer.Argument(help="a run folder written by a tunekit training command")]
DataOpt = Annotated[str, typer.Option("--data", help="data file with the same columns as the run's training data")]


def train_command(
    command: str, method: ModuleType, recipe: str, overrides: list[str] | None,
    output_dir: str | None, overwrite: bool, dry_run: bool, peft_default: str | None = None,
) -> None:
    """The shared path of every training command: config -> data check -> run -> print run folder."""
    from tunekit.config import load_config, to_yaml
    from tunekit.models import check_model_reference
    from tunekit.outputs import check_run_dir, default_run_dir

    overrides = list(overrides or [])
    if peft_default:  # `tunekit lora`: the adapter is on unless the user chose another method
        overrides.insert(0, f"peft.method={peft_default}")
    config = load_config(method.Config, recipe, overrides)
    run_dir = Path(output_dir or config.output_dir or default_run_dir(command, config.source))
    check_run_dir(run_dir, overwrite)
    check_model_reference(config.model)
    data = method.check(config)
    if dry_run:
        typer.echo(to_yaml(config).rstrip())
        typer.echo(f"# recipe and data OK; a run would write {run_dir}", err=True)
        return
    # Libraries print progress and log lines on stdout; keep stdout for the result alone.
    with contextlib.redirect_stdout(sys.stderr):
        method.run(config, data, run_dir, overwrite=overwrite)
    typer.echo(str(run_dir))


def method_of(command: str) -> ModuleType:
    """The module of a training command (an explicit list, no registry)."""
    from tunekit.methods import classify

    modules = {"classify": classify}
    if command not in modules:
        raise UserError(f"unknown method {command!r}; one of: {', '.join(modules)}")
    return modules[command]


@app.command()
def classify(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None,
    overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False,
) -> None:
    """Fine-tune an encoder with a classification (or regression) head, BERT style."""
    train_command("classify", method_of("classify"), recipe, set_, output_dir, overwrite, dry_run)


@app.command()
def lora(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None,
    overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False,
) -> None:
    """Run any recipe with a LoRA adapter switched on (override with --set peft.*)."""
    from tunekit.config import find_recipe, read_yaml_mapping

    path = find_recipe(recipe)
    command = read_yaml_mapping(path).get("method") or path.parent.name
    train_command("lora", method_of(command), str(path), set_, output_dir, overwrite, dry_run, peft_default="lora")


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe and its data without training (exit code 2 on a problem)."""
    from tunekit.config import find_recipe, read_yaml_mapping

    path = find_recipe(recipe)
    command = read_yaml_mapping(path).get("method") or path.parent.name
    train_command(command, method_of(command), str(path), set_, None, True, True)


@app.command("eval")
def eval_(run: RunArg, data: DataOpt) -> None:
    """Metrics of a finished run on another data file; the last stdout line is a JSON object."""
    from tunekit.outputs import run_method

    method = method_of(run_method(run))
    with contextlib.redirect_stdout(sys.stderr):
        metrics = method.eval_run(run, data)
    typer.echo(json.dumps(metrics))


@app.command()
def predict(
    run: RunArg, data: DataOpt,
    out: Annotated[Path | None, typer.Option("--out", help="output file (default RUN/predictions.jsonl)")] = None,
) -> None:
    """Predictions of a finished run for every row of a data file, as JSON lines."""
    from tunekit.outputs import run_method, write_atomic

    method = method_of(run_method(run))
    with contextlib.redirect_stdout(sys.stderr):
        rows = method.predict_run(run, data)
    out = out or run / "predictions.jsonl"
    write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    typer.echo(str(out))


@app.command()
def recipes() -> None:
    """List the recipes that ship with tunekit."""
    from tunekit.config import read_yaml_mapping, shipped_recipes

    for name, path in shipped_recipes().items():
        description = read_yaml_mapping(path).get("description", "")
        typer.echo(f"{name:<40} {description}")


def quiet_library_noise() -> None:
    """bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel package is
    missing; the fallback it uses is correct, so the warning only confuses."""
    import logging
    import os

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    from tunekit.outputs import record_invocation

    quiet_library_noise()
    record_invocation(list(sys.argv[1:] if argv is None else argv))
    try:
        return app(args=argv, prog_name="tunekit")
    except UserError as err:
        typer.echo(f"tunekit: error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
