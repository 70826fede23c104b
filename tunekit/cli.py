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

from tunekit.errors import Interrupted, TrainingFailure, UserError

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


def train_command(
    command: str, method: ModuleType, recipe: str, overrides: list[str] | None,
    output_dir: str | None, overwrite: bool, dry_run: bool, peft_default: str | None = None,
    nproc: int | None = None, accelerate_config: str | None = None, resume: str | None = None,
) -> None:
    """The shared path of every training command: config -> data check -> run -> print run folder."""
    from tunekit.config import load_config, to_yaml
    from tunekit.launch import check_accelerate_config, is_first_rank, is_worker, relaunch
    from tunekit.models import check_model_reference
    from tunekit.outputs import check_run_dir, default_run_dir, find_checkpoint, run_status

    overrides = list(overrides or [])
    if peft_default:  # `tunekit lora`: the adapter is on unless the user chose another method
        overrides.insert(0, f"peft.method={peft_default}")
    config = load_config(method.Config, recipe, overrides)
    run_dir = Path(output_dir or config.output_dir or default_run_dir(command, config.source))
    checkpoint = find_checkpoint(run_dir, resume, config) if resume else None
    if not resume and not dry_run and not is_worker() and is_first_rank():
        check_run_dir(run_dir, overwrite)
    check_model_reference(config.model)
    if accelerate_config:
        check_accelerate_config(accelerate_config)
    data = method.check(config)
    if dry_run:
        typer.echo(to_yaml(config).rstrip())
        typer.echo(f"# recipe and data OK; a run would write {run_dir}", err=True)
        return
    if (nproc and nproc > 1) or accelerate_config:
        args = [command, config.source, *[a for o in overrides for a in ("--set", o)], "--output-dir", str(run_dir)]
        args += ["--overwrite"] * overwrite + (["--resume", str(checkpoint)] if checkpoint else [])
        code = relaunch(nproc, accelerate_config, args)
        if code != 0 and run_status(run_dir) == "interrupted":
            raise Interrupted(f"the latest checkpoint in {run_dir} is complete; continue with --resume")
        if code != 0:
            raise TrainingFailure(f"a process of the {nproc or 'configured'}-process run failed (exit code {code}); see above")
        return
    with library_output_to_stderr():
        method.run(config, data, run_dir, overwrite=overwrite and not checkpoint, resume=checkpoint)
    if is_first_rank():
        typer.echo(str(run_dir))


@contextlib.contextmanager
def library_output_to_stderr() -> Any:
    """For commands that load models: the libraries' own progress bars off (tunekit shows one
    display of its own), and what they print goes to stderr, so stdout holds the result alone."""
    from tunekit.progress import hide_library_bars

    hide_library_bars()
    with contextlib.redirect_stdout(sys.stderr):
        yield


METHODS = ("classify", "qa", "pretrain", "sft", "reward", "dpo", "rlhf")


def method_of(command: str) -> ModuleType:
    """The module of a training command (an explicit list, no registry); only that one is imported."""
    if command not in METHODS:
        raise UserError(f"unknown method {command!r}; one of: {', '.join(METHODS)}")
    if command == "classify":
        from tunekit.methods import classify as module
    elif command == "qa":
        from tunekit.methods import qa as module
    elif command == "pretrain":
        from tunekit.methods import pretrain as module
    elif command == "sft":
        from tunekit.methods import sft as module
    elif command == "reward":
        from tunekit.methods import reward as module
    elif command == "dpo":
        from tunekit.methods import dpo as module
    else:
        from tunekit.methods import rlhf as module
    return module


@app.command()
def classify(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Fine-tune an encoder with a classification (or regression) head, BERT style."""
    train_command("classify", method_of("classify"), recipe, set_, output_dir, overwrite, dry_run,
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def qa(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Fine-tune an encoder for extractive question answering (SQuAD style spans)."""
    train_command("qa", method_of("qa"), recipe, set_, output_dir, overwrite, dry_run,
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def pretrain(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Pre-train a language model (causal or masked) on text, from a config or a checkpoint."""
    train_command("pretrain", method_of("pretrain"), recipe, set_, output_dir, overwrite, dry_run,
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def sft(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Instruction fine-tuning of a causal LM, with the loss on the responses only."""
    train_command("sft", method_of("sft"), recipe, set_, output_dir, overwrite, dry_run,
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def reward(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Train a reward model on preference pairs (chosen scores above rejected: Bradley-Terry loss)."""
    train_command("reward", method_of("reward"), recipe, set_, output_dir, overwrite, dry_run,
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def dpo(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Tune a causal LM directly on preference pairs with DPO (no reward model)."""
    train_command("dpo", method_of("dpo"), recipe, set_, output_dir, overwrite, dry_run,
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def rlhf(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Tune a causal LM against a reward model: PPO (tunekit's own), or --set rlhf.algo=grpo|rloo."""
    train_command("rlhf", method_of("rlhf"), recipe, set_, output_dir, overwrite, dry_run,
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def lora(
    recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputOpt = None, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, nproc: NprocOpt = None, accelerate_config: AccelerateOpt = None, resume: ResumeOpt = None,
) -> None:
    """Run any recipe with a LoRA adapter switched on (override with --set peft.*)."""
    from tunekit.config import find_recipe, read_yaml_mapping

    path = find_recipe(recipe)
    command = read_yaml_mapping(path).get("method") or path.parent.name
    train_command("lora", method_of(command), str(path), set_, output_dir, overwrite, dry_run, peft_default="lora",
                  nproc=nproc, accelerate_config=accelerate_config, resume=resume)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe and its data without training (exit code 2 on a problem)."""
    from tunekit.config import find_recipe, read_yaml_mapping

    path = find_recipe(recipe)
    command = read_yaml_mapping(path).get("method") or path.parent.name
    train_command(command, method_of(command), str(path), set_, None, True, True)


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
    from tunekit.outputs import run_method

    if bool(data) == bool(task):
        raise UserError("give --data FILE (the run's own task) or --task TASK.yaml (LM tasks), not both or neither")
    if data:
        if len(targets) != 1:
            raise UserError("--data evaluates one run at a time")
        method = method_of(run_method(Path(targets[0])))
        with library_output_to_stderr():
            metrics = method.eval_run(Path(targets[0]), data)
        typer.echo(json.dumps(metrics))
        return
    from tunekit.lmeval import compare, table_of

    with library_output_to_stderr():
        results = compare(targets, task)
    typer.echo(table_of(results), err=True)
    if out:
        from tunekit.outputs import write_json

        write_json(out, results)
    typer.echo(json.dumps(results))


@app.command()
def predict(
    run: RunArg, data: DataOpt,
    out: Annotated[Path | None, typer.Option("--out", help="output file (default RUN/predictions.jsonl; .json for QA)")] = None,
) -> None:
    """Predictions of a finished run for every row of a data file, as JSON lines ({id: answer} for QA)."""
    from tunekit.outputs import run_method, write_atomic

    method = method_of(run_method(run))
    with library_output_to_stderr():
        rows = method.predict_run(run, data)
    if isinstance(rows, dict):  # QA: one {id: answer} object, the official SQuAD evaluation format
        out = out or run / "predictions.json"
        write_atomic(out, json.dumps(rows, ensure_ascii=False) + "\n")
    else:
        out = out or run / "predictions.jsonl"
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    typer.echo(str(out))


@app.command()
def preview(
    recipe: RecipeArg, set_: SetOpt = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="how many examples to print")] = 3,
) -> None:
    """Show which tokens of an SFT recipe's data carry loss ([[trained]] vs plain); exit 2 if one carries none."""
    from tunekit.config import load_config
    from tunekit.methods import sft as method
    from tunekit.preview import preview_data

    config = load_config(method.Config, recipe, list(set_ or []))
    preview_data(config, method.check(config), examples)


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
    from tunekit.generation import generate as sample
    from tunekit.generation import load_chat_model, settings_with
    from tunekit.masking import prompts_of_file
    from tunekit.methods.sft import heldout_prompts
    from tunekit.outputs import write_atomic

    if not prompt and not data and not heldout:
        raise UserError("give --prompt TEXT, --data FILE or --heldout N")
    with library_output_to_stderr():
        if heldout:
            conversations = heldout_prompts(Path(run), heldout)
        elif data:
            conversations = prompts_of_file(data)
        else:
            conversations = [[{"role": "user", "content": p}] for p in prompt]
        model, tokenizer, settings = load_chat_model(run)
        chosen = settings_with(settings, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        results = sample(model, tokenizer, conversations, **chosen)
    if not data and not heldout:
        for result in results:
            typer.echo(result["response"])
        return
    out = out or Path(run) / "generations.jsonl"
    rows = [{"prompt": c[-1]["content"], **r} for c, r in zip(conversations, results)]
    write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    stopped = sum(r["stopped"] for r in results)
    typer.echo(f"{stopped} of {len(results)} responses ended by themselves (EOS)", err=True)
    typer.echo(str(out))


@app.command()
def chat(
    run: Annotated[str, typer.Argument(help="a run folder, or any causal LM id/folder")],
    system: Annotated[str | None, typer.Option(help="system message")] = None,
) -> None:
    """Talk to a model in the terminal (/reset clears the history, /exit or Ctrl-D quits)."""
    from tunekit.generation import generate as sample
    from tunekit.generation import load_chat_model, settings_with

    with library_output_to_stderr():
        model, tokenizer, settings = load_chat_model(run)
    history = [{"role": "system", "content": system}] if system else []
    start = list(history)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = sample(model, tokenizer, [history], **settings_with(settings))[0]["response"]
        history.append({"role": "assistant", "content": reply})
        typer.echo(f"model> {reply}")


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
    from tunekit.inventory import recipe_rows, table

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
    from tunekit.config import find_recipe

    source = find_recipe(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise UserError(f"{target}: exists; choose another destination")
    target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    typer.echo(str(target))


data_app = typer.Typer(help="The recipes' data: prepare (check, tokenise and cache) it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check, tokenise and cache an sft or pretrain recipe's data, train nothing (then every run,
    resume and rank reuses it); prints rows, tokens, trained tokens and the cache path."""
    from tunekit.prepare import prepare_command, summary

    with library_output_to_stderr():
        prepared = prepare_command(recipe, set_ or [])
    typer.echo(summary(prepared))


@app.command()
def runs(
    folder: Annotated[Path, typer.Argument(help="folder holding run folders")] = Path("runs"), as_json: JsonOpt = False,
) -> None:
    """List run folders: method, base model, status, key metric, wall time."""
    from tunekit.inventory import run_rows, table

    rows = run_rows(folder)
    typer.echo(json.dumps(rows) if as_json else table(rows, ["run", "method", "status", "metric", "value", "wall_time_s", "base_model"]))


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Versions, devices, CUDA/bf16 support and whether the Hub is reachable."""
    from tunekit.inventory import doctor_report

    with library_output_to_stderr():
        report = doctor_report()
    if as_json:
        typer.echo(json.dumps(report))
        return
    for key, value in report.items():
        shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
        typer.echo(f"{key:<12} {shown}")


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
    from tunekit.outputs import record_invocation

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
