"""Several processes: `--nproc N` re-launches the same tunekit command under `accelerate launch`.

The parent validates the recipe and the data first (so bad input is one line, not N), then starts
the workers and waits. Each worker checks that the process count it joined is the one asked for:
`accelerate launch --cpu --num_processes 2` silently starts one process, so on a machine without
CUDA tunekit launches with --multi_gpu, which gives real processes on gloo.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunekit.config import Recipe
    from tunekit.distributed import EngineName

EXPECTED = "TUNEKIT_EXPECTED_PROCESSES"  # set by the parent for its workers
LAUNCHED = "TUNEKIT_LAUNCHED"


def is_worker() -> bool:
    """True inside a process started by `--nproc` (the parent has checked the run folder)."""
    return os.environ.get(LAUNCHED) == "1"


def is_first_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(nproc: int | None, accelerate_config: str | None, tunekit_args: list[str]) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        command += ["--config_file", accelerate_config]
    if nproc:
        command += ["--num_processes", str(nproc)]
        if nproc > 1 and not accelerate_config:
            command += ["--multi_gpu", "--num_machines", "1", "--main_process_port", str(free_port())]
    return [*command, "-m", "tunekit", *tunekit_args]


def relaunch(nproc: int | None, accelerate_config: str | None, tunekit_args: list[str]) -> int:
    """Run the workers to completion; their exit code is ours. If one worker fails, accelerate's
    launcher (torch elastic) stops the others, so a failed rank never leaves the run hanging."""
    env = {**os.environ, LAUNCHED: "1"}
    if nproc:
        env[EXPECTED] = str(nproc)
    print(f"tunekit: launching {nproc or 'configured'} processes with accelerate", file=sys.stderr, flush=True)
    process = subprocess.Popen(launch_command(nproc, accelerate_config, tunekit_args), env=env)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # the workers got the Ctrl-C too: let them save a checkpoint and stop
            print("tunekit: waiting for the workers to save a checkpoint and stop", file=sys.stderr, flush=True)


def leave_process_group() -> None:
    """A worker's last step after a finished run: all processes leave their process group together.
    Left to the interpreter's exit, a gloo group can abort a process after training has finished
    ("terminate called without an active exception", SIGABRT), and the run then reports a failure."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def check_world_size(world_size: int) -> str | None:
    """A message when the processes that started are not the ones asked for."""
    expected = os.environ.get(EXPECTED)
    if expected and int(expected) != world_size:
        return (f"asked for {expected} processes but {world_size} started; on a machine without CUDA launch with "
                "`accelerate launch --multi_gpu --num_processes N` (with --cpu accelerate starts one process)")
    return None


DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


def check_accelerate_config(path: str) -> None:
    """A readable accelerate config with a known distributed_type (checked before launching)."""
    from tunekit.config import read_yaml_mapping
    from tunekit.errors import UserError

    data = read_yaml_mapping(Path(path))
    kind = data.get("distributed_type")
    if kind not in DISTRIBUTED_TYPES:
        raise UserError(f"{path}: distributed_type: expected one of {', '.join(DISTRIBUTED_TYPES)}, got {kind!r}")
    processes = data.get("num_processes", 1)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise UserError(f"{path}: num_processes: expected a positive integer, got {processes!r}")


def engine_of(accelerate_config: str | None, nproc: int | None = None) -> EngineName:
    """The engine a launch asks for: 'single', 'ddp', 'fsdp' or 'deepspeed' (see tunekit.distributed),
    from the accelerate config's distributed_type and the process count. Cheap: reads YAML only."""
    from tunekit.config import read_yaml_mapping

    data = read_yaml_mapping(Path(accelerate_config)) if accelerate_config else {}
    kind = data.get("distributed_type")
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return "deepspeed"
    processes = nproc or data.get("num_processes", 1)  # all processes, over all machines
    return "ddp" if processes > 1 and kind != "NO" else "single"


def check_engine(config: Recipe, accelerate_config: str | None, nproc: int | None,
                 checkpoint: Path | None = None) -> None:
    """Refuse, before any process starts, an engine that cannot run this recipe on this machine, or
    that cannot read the checkpoint to resume from. Inside processes that `accelerate launch` started
    with a config of its own, the engine is the one it exported."""
    from tunekit.distributed import running
    from tunekit.errors import UserError

    engine = engine_of(accelerate_config, nproc) if accelerate_config else running().name
    where = f"--accelerate-config {accelerate_config}" if accelerate_config else f"accelerate launch ({engine})"
    sharded = checkpoint is not None and (checkpoint / "pytorch_model_fsdp_0").is_dir()
    if checkpoint is not None and sharded != (engine == "fsdp"):
        saved = "sharded by FSDP" if sharded else "unsharded"
        raise UserError(f"--resume {checkpoint}: the checkpoint is {saved} and this run would use {engine}; "
                        "resume with the --accelerate-config it was saved with")
    if engine == "deepspeed":
        if not cuda_available():
            raise UserError(f"{where}: DeepSpeed needs CUDA GPUs and this machine has none; on CPUs use "
                            "recipes/accelerate/fsdp.yaml (sharded) or --nproc N (DDP)")
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"{where}: DeepSpeed is not installed; pip install 'tunekit[deepspeed]'")
    if engine not in ("fsdp", "deepspeed"):
        return
    rlhf = getattr(config, "rlhf", None)  # only `tunekit rlhf` recipes have this section
    if rlhf is not None and rlhf.algo == "ppo":
        raise UserError(f"{where}: rlhf.algo: ppo does not run under {engine} yet (tunekit's PPO loop does not "
                        "shard its models); use --nproc N (DDP) or recipes/accelerate/ddp.yaml")
    if engine == "fsdp" and rlhf is not None and not cuda_available():
        # TRL's GRPO/RLOO trainers build their Accelerator themselves, where tunekit's CPU FSDP switch
        # (tunekit.upstream.fsdp_on_cpu) is not applied, so they would load every model and then stop.
        raise UserError(f"{where}: rlhf.algo: {rlhf.algo} under FSDP needs CUDA GPUs (not supported on CPUs); "
                        "use --nproc N (DDP) or recipes/accelerate/ddp.yaml")
    if engine == "fsdp" and config.peft.quantize != "none" and not cuda_available():
        raise UserError(f"{where}: peft.quantize: {config.peft.quantize} (QLoRA) under FSDP needs CUDA GPUs (not "
                        "supported on CPUs); set peft.quantize: none, or train QLoRA in one process")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
