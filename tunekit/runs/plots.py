"""The run folder's charts, drawn from metrics.jsonl when a run finishes: `loss.png` for every
method, `reward.png` for rlhf. Related series sit on stacked panels with a shared step axis, never
on twin y axes, so no legend covers another axis and each axis says what it measures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunekit.jsontypes import JsonObject

# metrics.jsonl key -> legend label, for the loss panel (PPO logs its two losses, Trainers `loss`)
LOSSES = {"loss": "training loss", "eval_loss": "evaluation loss", "policy_loss": "policy loss", "value_loss": "value loss"}
def read_records(metrics_path: Path) -> list[JsonObject]:
    if not metrics_path.exists():
        return []
    return [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(records: list[JsonObject], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and "step" in r]


def step_label(unit: str | None) -> str:
    """What one step is (the method says): a PPO/GRPO step is a round of rollouts, a Trainer step one
    optimizer update."""
    return f"step ({unit or 'optimizer updates'})"


def plot_losses(metrics_path: Path, out: Path, method: str | None = None, units: str | None = None,
                step_unit: str | None = None) -> bool:
    """loss.png; False (and no file) when the run logged no loss. `units` says what the method's
    loss is, for the y axis (tunekit.method.Method.loss_units)."""
    fig = loss_figure(read_records(metrics_path), method, metrics_path.parent.name, units, step_unit)
    if fig is not None:
        save(fig, out)
    return fig is not None


def plot_rewards(metrics_path: Path, out: Path, kl_per_token: bool = False) -> bool:
    """reward.png; False (and no file) when the run logged no reward."""
    fig = reward_figure(read_records(metrics_path), kl_per_token, metrics_path.parent.name)
    if fig is not None:
        save(fig, out)
    return fig is not None


def loss_figure(records: list[JsonObject], method: str | None, name: str, units: str | None = None,
                step_unit: str | None = None) -> Any:
    """Losses against step and, below, the learning rate schedule when it was logged."""
    losses = {label: points for key, label in LOSSES.items() if (points := series(records, key))}
    if not losses:
        return None
    if "policy loss" in losses and "training loss" in losses:  # PPO: `loss` is policy + vf_coef * value
        losses = {"total loss" if label == "training loss" else label: points for label, points in losses.items()}
    rate = series(records, "learning_rate")
    plt = pyplot()
    panels = 2 if rate else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3.2 + 1.6 * (panels - 1)), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.3][:panels]})
    top = axes[0][0]
    for label, points in losses.items():
        top.plot(*zip(*points), label=label, marker="o" if len(points) < 12 or label == "evaluation loss" else None,
                 markersize=3)
    top.set_ylabel(f"loss\n{units or 'mean over the logging window'}")
    top.set_title(f"tunekit {method or ''}: {name}", fontsize=10)
    top.legend(loc="best", fontsize=8, framealpha=0.9)
    top.grid(alpha=0.3)
    if rate:
        low = axes[1][0]
        low.plot(*zip(*rate), color="tab:gray")
        low.set_ylabel("learning rate")
        low.yaxis.set_major_formatter("{x:g}")  # 2e-05 on the tick itself, no offset text above the panel
        low.grid(alpha=0.3)
    axes[-1][0].set_xlabel(step_label(step_unit))
    return layout(fig)


def reward_figure(records: list[JsonObject], kl_per_token: bool, name: str) -> Any:
    """Mean reward against step and, below, the KL divergence of the policy from the reference; with
    a judge (tunekit.rl.judge), a bottom row of the held-out evaluation points: the proxy's and the
    judge's mean score against the KL, side by side (two scales, never one twin axis)."""
    reward, kl = series(records, "reward"), series(records, "kl")
    if not reward:
        return None
    points = [r for r in records if all(isinstance(r.get(k), int | float) for k in ("eval/proxy", "eval/judge", "eval/kl"))]
    plt = pyplot()
    rows = 1 + bool(kl) + bool(points)
    fig = plt.figure(figsize=(7, 3.2 + 1.8 * (rows - 1) + 0.6 * bool(points)))
    grid = fig.add_gridspec(rows, 2)
    top = fig.add_subplot(grid[0, :])
    top.plot(*zip(*reward), color="tab:blue", marker="o" if len(reward) < 12 else None, markersize=3)
    top.set_ylabel("mean reward\nreward model score")
    top.set_title(f"tunekit rlhf: {name}", fontsize=10)
    top.grid(alpha=0.3)
    steps = top
    if kl:
        steps = fig.add_subplot(grid[1, :], sharex=top)
        steps.plot(*zip(*kl), color="tab:orange", marker="o" if len(kl) < 12 else None, markersize=3)
        steps.set_ylabel("KL to reference\n" + ("nats per token" if kl_per_token else "nats per response"))
        steps.grid(alpha=0.3)
        top.tick_params(labelbottom=False)
    steps.set_xlabel(step_label("rounds of rollouts"))
    for column, (key, label, color) in enumerate((("eval/proxy", "proxy (training reward)", "tab:blue"),
                                                  ("eval/judge", "held-out judge", "tab:green"))):
        if not points:
            break
        ax = fig.add_subplot(grid[rows - 1, column])
        ax.plot([r["eval/kl"] for r in points], [r[key] for r in points], color=color, marker="o", markersize=3)
        for r in points[:: max(len(points) // 6, 1)]:  # a few step labels: where on the run each point is
            ax.annotate(str(r["step"]), (r["eval/kl"], r[key]), fontsize=6, textcoords="offset points", xytext=(2, 2))
        ax.set_ylabel(f"{label}\nheld-out mean")
        ax.set_xlabel("KL to reference (nats per response)")
        ax.grid(alpha=0.3)
    return layout(fig, steps)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, works on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def layout(fig: Any, steps: Any = None) -> Any:
    """Whole-number ticks on the axis that counts steps (`steps`; default: the bottom one), and the
    tick labels of every panel written out."""
    from matplotlib.ticker import MaxNLocator

    (steps or fig.axes[-1]).xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in fig.axes:  # tick labels carry the whole value; no "1e-7-1.7e-2" offset text above a panel
        if type(ax.yaxis.get_major_formatter()).__name__ == "ScalarFormatter":
            ax.ticklabel_format(axis="y", useOffset=False)
    fig.align_ylabels()
    fig.tight_layout()
    return fig


def save(fig: Any, out: Path) -> None:
    """Written under a temporary name and renamed, like every file of a run folder."""
    import os

    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    fig.clf()
    pyplot().close(fig)
