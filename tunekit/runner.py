"""The shared path of every training command: config -> run folder check -> data check -> train
here, or re-launch under accelerate. The CLI's training commands are one call to `train_command`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tunekit.console import library_output_to_stderr
from tunekit.errors import Interrupted, TrainingFailure

if TYPE_CHECKING:
    from tunekit.methods import Method


def train_command(
    command: str, method: Method, recipe: str, overrides: list[str] | None,
    output_dir: str | None, overwrite: bool, dry_run: bool, peft_default: str | None = None,
    nproc: int | None = None, accelerate_config: str | None = None, resume: str | None = None,
) -> None:
    """Validate everything before a model loads, then run the method (or its workers); the run
    folder is printed last on stdout, so a Makefile can chain steps."""
    from tunekit.config import to_yaml
    from tunekit.launch import (
        check_accelerate_config,
        check_engine,
        is_first_rank,
        is_worker,
        leave_process_group,
        relaunch,
    )
    from tunekit.methods import load_recipe
    from tunekit.models import check_model_reference
    from tunekit.runs.folder import check_run_dir, default_run_dir, find_checkpoint, run_status

    overrides = list(overrides or [])
    if peft_default:  # `tunekit lora`: the adapter is on unless the user chose another method
        overrides.insert(0, f"peft.method={peft_default}")
    config = load_recipe(method, recipe, overrides)
    run_dir = Path(output_dir or config.output_dir or default_run_dir(command, config.source))
    checkpoint = find_checkpoint(run_dir, resume, config) if resume else None
    if not resume and not dry_run and not is_worker() and is_first_rank():
        check_run_dir(run_dir, overwrite)
    if accelerate_config:
        check_accelerate_config(accelerate_config)
    check_engine(config, accelerate_config, nproc, checkpoint)
    check_model_reference(config.model)
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
    from tunekit.training import execute

    with library_output_to_stderr():
        execute(method, config, data, run_dir, overwrite=overwrite and not checkpoint, resume=checkpoint)
    leave_process_group()
    if is_first_rank():
        typer.echo(str(run_dir))


def recipe_command(path: Path) -> str:
    """The command a recipe file is for: its `method:` key, else the folder it ships in."""
    from tunekit.config import read_yaml_mapping

    return read_yaml_mapping(path).get("method") or path.parent.name
