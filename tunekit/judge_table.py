"""The over-optimisation table of examples/rlhf-real.mk, from what the runs wrote: one row per PPO run
with a judge (rlhf.judge), no figure typed by hand.

    python -m tunekit.judge_table runs/lora-smollm2-sentiment-ppo-kl*

Each row: the run's KL coefficient (its config.yaml), the proxy's and the judge's held-out means
before -> after, the final KL to the reference, and the judge's win rate of the final policy over the
starting one +- its standard error (eval.json). A proxy that rises while the judge's win rate falls
towards or under 50% is where over-optimisation starts. The commit the runs recorded is named below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunekit.files import read_json
from tunekit.runs.folder import read_run_config, recorded_version

HEADER = ("| run | ppo.kl_coef | proxy before -> after | judge before -> after | KL (nats) | judge win rate |\n"
          "|---|---|---|---|---|---|")


def row(run: Path) -> str | None:
    """The run's table row; None when it has no judge figures (not finished, or no rlhf.judge)."""
    metrics = read_json(run / "eval.json") if (run / "eval.json").is_file() else {}
    if "judge_win_rate" not in metrics:
        return None
    ppo = read_run_config(run).get("ppo") or {}
    return (f"| {run.name} | {ppo.get('kl_coef')} | {metrics['reward_before']:.3f} -> {metrics['reward_after']:.3f} | "
            f"{metrics['judge_before']:.3f} -> {metrics['judge_after']:.3f} | {metrics['kl']:.2f} | "
            f"{metrics['judge_win_rate']:.1%} +- {metrics['judge_win_rate_se']:.1%} (n={metrics['judge_prompts']}) |")


def table(runs: list[Path]) -> str:
    rows = [line for run in sorted(runs) if (line := row(run))]
    if not rows:
        return "no finished rlhf run with rlhf.judge among: " + ", ".join(str(r) for r in runs)
    commits = sorted({recorded_version(r) for r in runs if (r / "run.json").is_file()})
    return "\n".join([HEADER, *rows, "", f"tunekit {', '.join(commits)}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="rlhf run folders with a judge")
    print(table(parser.parse_args(argv).runs))


if __name__ == "__main__":
    main()
