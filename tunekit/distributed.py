"""The distributed engine a run trains with: one process, DDP, FSDP or DeepSpeed, and what it shards.

`tunekit.launch.engine_of` names the engine an accelerate config asks for, before any process
starts; inside a worker, `running()` reads the same from the environment that `accelerate launch`
sets, and `check_started` makes sure the Trainer's accelerator really set that engine up (accelerate
falls back to DDP silently in some set-ups; see tunekit.upstream.fsdp_on_cpu). A sharded model is
consolidated into one full state dict for `model/` by `full_state_dict`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunekit.errors import TrainingFailure

ParallelismName = Literal["single", "ddp", "fsdp", "deepspeed"]
INSPECT = "TUNEKIT_INSPECT"  # tests only: a folder where each rank describes its model as training starts


@dataclass(frozen=True)
class Parallelism:
    name: ParallelismName
    sharding: str  # what is split over the processes, in words, for run.json and the banner


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def running() -> Parallelism:
    """The engine this process was launched for (`accelerate launch` exports the config as variables)."""
    processes = world_size()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return Parallelism("fsdp", fsdp_sharding(processes))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return Parallelism("deepspeed", zero_sharding(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?"), processes))
    if processes > 1:
        return Parallelism("ddp", f"none: each of {processes} processes holds the whole model and optimizer")
    return Parallelism("single", "none: one process")


def fsdp_sharding(processes: int) -> str:
    version = os.environ.get("FSDP_VERSION", "1")
    if version == "2":
        kept = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "false"
        how = "FSDP2, parameters kept gathered from forward to backward" if kept else "FSDP2 full shard"
    else:
        how = f"FSDP1 {os.environ.get('FSDP_SHARDING_STRATEGY', 'FULL_SHARD')}"
    return f"parameters, gradients and optimizer state over {processes} processes ({how})"


def zero_sharding(stage: str, processes: int) -> str:
    parts = {"1": "optimizer state", "2": "optimizer state and gradients",
             "3": "parameters, gradients and optimizer state"}.get(stage, "see the DeepSpeed config")
    return f"{parts} over {processes} processes (ZeRO stage {stage})"


WAIT_POLL_S = 0.5  # how often a waiting rank looks for its local main process's signal


@contextlib.contextmanager
def local_main_first(args: Any, desc: str) -> Iterator[None]:
    """Local rank 0 runs the block first (building a cached result: a tokenised dataset, a packed
    corpus), the other ranks of its machine after it.

    The others wait by polling a signal file, not at a collective barrier: a barrier is bounded by
    the collective timeout (train.ddp_timeout, 30 min), which a cold preparation of a large dataset
    outlasts, and the waiting ranks then died. The wait here has no limit as long as the local main
    process lives; it ends with one line when that process fails or dies. The file is in this
    machine's temp folder, named by a token that global rank 0 draws for this call (so no earlier
    run's file is ever taken for it) and by the machine's first rank (machines may share a disk)."""
    import torch.distributed as dist

    # All ranks arrive here together (the slow part is inside), so this exchange waits for nobody.
    mine = (uuid.uuid4().hex if args.process_index == 0 else None, os.getpid())
    gathered: list[Any] = [None] * args.world_size
    dist.all_gather_object(gathered, mine)
    first = args.process_index - args.local_process_index  # the global rank of this machine's local main
    signal = Path(tempfile.gettempdir()) / f"tunekit-first-{gathered[0][0]}-{first}"
    if args.local_process_index != 0:
        wait_for_signal(signal, gathered[first][1], desc)
        yield
        return
    forget_old_signals(signal.parent)
    try:
        yield
    except BaseException as err:
        write_signal(signal, f"failed: {type(err).__name__}")
        raise
    write_signal(signal, "done")


def forget_old_signals(folder: Path) -> None:
    """Signals are left for the waiting ranks, which read them at any time; a day later nobody will."""
    for old in folder.glob("tunekit-first-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 86400:
                old.unlink()


def write_signal(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def wait_for_signal(path: Path, pid: int, desc: str) -> None:
    while True:
        said = path.read_text() if path.exists() else None
        if said is None and not process_alive(pid):
            said = path.read_text() if path.exists() else "ended"  # it may have signalled, then died
        if said == "done":
            return
        if said is not None:
            raise TrainingFailure(f"the local main process (pid {pid}) {said} while {desc}; see its message above")
        time.sleep(WAIT_POLL_S)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def engine_of_accelerator(accelerator: Any) -> ParallelismName:
    """The engine an Accelerator actually set up."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_started(trainer: Any) -> None:
    """Stop before the first step when the Trainer's accelerator is not the engine that was asked for."""
    asked, started = running().name, engine_of_accelerator(trainer.accelerator)
    if asked != started:
        raise TrainingFailure(f"the accelerate config asks for {asked}, but accelerate set up {started} "
                              f"({trainer.accelerator.distributed_type}); not training with an engine that was not asked for")


def is_sharded(model: Any) -> bool:
    """True for a model whose parameters are split over processes (FSDP2 DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: Any) -> dict[str, Any] | None:
    """The whole model's weights on CPU, gathered from every rank (all ranks must call this); the
    full dict on rank 0, an empty one elsewhere. None for a model that is not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def describe_for_tests(model: Any, rank: int) -> None:
    """Tests only (TUNEKIT_INSPECT=folder): what this rank holds of its model, as training starts,
    and whether a DistributedDataParallel wrapper exists anywhere in the process."""
    folder = os.environ.get(INSPECT)
    if not folder:
        return
    import gc

    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    parameters = []
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        parameters.append({"name": name, "type": type(p).__name__, "numel": p.numel(), "local_numel": local.numel()})
    report = {
        "rank": rank, "model_class": type(model).__name__, "parameters": parameters,
        "ddp_wrappers": sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()),
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(report))
