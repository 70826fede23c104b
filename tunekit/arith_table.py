"""The README's arithmetic tables, regenerated from what the chains wrote: one command, no figure
typed by hand.

    python -m tunekit.arith_table runs        # after `make smol` (and `make arith` for the tiny GPT)

Real model (examples/smol.mk): every `tunekit eval --out` file in RUNS/smol-eval/ is a row (its name:
base, sft, grpo, grpo-seed1, ppo, ...), with each task's exact-answer accuracy +- its standard error,
and the CPU minutes (user + system) and peak memory of the step that trained it and of its
evaluation, from the `/usr/bin/time -v` reports NAME.txt and eval-NAME.txt in RUNS/smol-time/, in
the chain's order. Rows named grpo-seed* are also summarised as mean and spread. Tiny GPT
(examples/arith.mk): the same for RUNS/tiny-eval/ and RUNS/tiny-time/ (sft, grpo, ppo), then each
RL run's own held-out accuracy before and after (its eval.json) and CPU minutes (its time.txt). The
tables name the tunekit commits their runs recorded (run.json's `tunekit`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from tunekit.runs.folder import recorded_version

TASKS = ("arith-exact", "arith-exact-sampled", "arith-hard-exact", "arith-hard-exact-sampled")
TRAINED_BY = {"sft": "lora-smollm2-arith", "grpo": "lora-smollm2-arith-grpo", "ppo": "lora-smollm2-arith-ppo"}
CHAIN = ("base", "sft", "grpo", "ppo")  # the rows' order: the chain's, each step's seeds after it
TINY = ("sft-tiny-gpt-arith", "rlhf-tiny-gpt-arith-grpo", "rlhf-tiny-gpt-arith-ppo")


def cpu_and_memory(report: Path) -> tuple[float, float] | None:
    """CPU minutes (user + system) and peak resident memory in GB of a `/usr/bin/time -v` report."""
    if not report.is_file():
        return None
    text = report.read_text()
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([0-9.]+)", text))
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return cpu / 60, (int(peak.group(1)) / 1e6 if peak else float("nan"))


def accuracy(metrics: dict[str, float] | None) -> str:
    if not metrics or "exact_answer" not in metrics:
        return "-"
    return f"{metrics['exact_answer']:.3f} +- {metrics.get('exact_answer_se', float('nan')):.3f}"


def chain_order(path: Path) -> tuple[int, str]:
    """Sort key of an eval file: its step's place in CHAIN (a seed's file, grpo-seed1, after its
    step's), then its name; names of no step last."""
    step = next((i for i, name in enumerate(CHAIN) if path.stem == name or path.stem.startswith(f"{name}-")), len(CHAIN))
    return step, path.stem


def cost(report: Path) -> str:
    """"CPU min | peak GB" of a step's `/usr/bin/time -v` report, or "- | -" without one."""
    timing = cpu_and_memory(report)
    return f"{timing[0]:.1f} | {timing[1]:.2f}" if timing else "- | -"


def eval_table(evals: Path, times: Path) -> list[str]:
    """One row per `tunekit eval --out` file in `evals` (named by its file), a column per task that any
    of them holds (in TASKS order), and the CPU minutes and peak memory of the step that trained it
    (`times`/NAME.txt, a `/usr/bin/time -v` report) and of its evaluation (`times`/eval-NAME.txt), in
    the chain's order (CHAIN). Rows named grpo or grpo-seed* are also summarised as mean and spread."""
    files = sorted(evals.glob("*.json"), key=chain_order)
    results = {path.stem: next(iter(json.loads(path.read_text()).values())) for path in files}
    tasks = [t for t in TASKS if any(t in by_task for by_task in results.values())]
    if not tasks:
        return []
    lines = ["| model | " + " | ".join(tasks) + " | step CPU min | step peak GB | eval CPU min | eval peak GB |",
             "|---" * (len(tasks) + 5) + "|"]
    seeds: dict[str, list[float]] = {}
    for name, by_task in results.items():
        lines.append(f"| {name} | " + " | ".join(accuracy(by_task.get(t)) for t in tasks)
                     + f" | {cost(times / f'{name}.txt')} | {cost(times / f'eval-{name}.txt')} |")
        if name.startswith("grpo-seed") or name == "grpo":
            for task in tasks:
                if task in by_task:
                    seeds.setdefault(task, []).append(by_task[task]["exact_answer"])
    summary = [f"GRPO over {len(values)} seeds, {task}: mean {statistics.mean(values):.3f}, "
               f"spread (min-max) {min(values):.3f}-{max(values):.3f}" for task, values in seeds.items() if len(values) > 1]
    return lines + ([""] + summary if summary else [])


def real_table(runs: Path) -> list[str]:
    lines = eval_table(runs / "smol-eval", runs / "smol-time")
    if not lines:
        return []
    folders = [runs / folder for folder in TRAINED_BY.values()] + sorted(runs.glob(f"{TRAINED_BY['grpo']}-seed*"))
    commits = {recorded_version(folder) for folder in folders if folder.is_dir()}
    return [f"Real model (SmolLM2-135M-Instruct), runs on tunekit {', '.join(sorted(commits)) or '?'}:", "", *lines]


def tiny_table(runs: Path) -> list[str]:
    """`tunekit eval` of each model of examples/arith.mk (RUNS/tiny-eval/*.json: greedy and sampled on
    all 500 held-out problems), then each RL run's own before -> after (its eval.json) and CPU minutes."""
    lines = []
    for folder in TINY[1:]:
        run = runs / folder
        path = run / "eval.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        timing = cpu_and_memory(run / "time.txt")
        before, after = metrics.get("exact_answer_before"), metrics.get("exact_answer_after")
        shown = f"{before:.3f} -> {after:.3f}" if before is not None and after is not None else "-"
        lines.append(f"| {folder} | {shown} | {f'{timing[0]:.1f}' if timing else '-'} | {recorded_version(run)} |")
    if lines:
        lines = ["", "| RL run | its eval.json: exact answer before -> after (sampled) | CPU min | tunekit |",
                 "|---|---|---|---|", *lines]
    evals = eval_table(runs / "tiny-eval", runs / "tiny-time")
    if not lines and not evals:
        return []
    return ["Tiny GPT (examples/arith.mk):", "", *evals, *lines]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tunekit.arith_table", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="?", default=Path("runs"), help="the chains' runs folder")
    args = parser.parse_args(argv)
    tables = [t for t in (real_table(args.runs), tiny_table(args.runs)) if t]
    if not tables:
        raise SystemExit(f"{args.runs}: no smol-eval/*.json and no tiny arithmetic runs; run `make smol` or `make arith`")
    print("\n\n".join("\n".join(t) for t in tables))


if __name__ == "__main__":
    main()
