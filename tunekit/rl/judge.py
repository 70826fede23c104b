"""A held-out judge beside the training reward (`rlhf.judge`): the check for reward over-optimisation.

The policy is trained against a proxy (the reward model); the judge is a second scorer it never
trains against: a `tunekit reward` run (its one output), or a `tunekit classify` run (the probability
of its positive class, `rlhf.judge_label`). Every `ppo.eval_steps` rounds the policy answers the same
held-out prompts with the same sampling seed, and both score the answers: metrics.jsonl gets
`eval/proxy`, `eval/judge` and `eval/kl` (step 0: the starting policy), reward.png plots both against
the KL. When the proxy keeps rising while the judge falls, the policy is pleasing the proxy rather
than the goal behind it. eval.json adds the judge's mean before and after and the judge's win rate of
the final policy over the starting one on the same prompts (per prompt: the final response's judge
score above the starting one's; ties count half) with its standard error, and 10 sample prompts
with both responses. `rlhf.keep: best_judge` keeps the policy of the evaluation point (after step
1 or later) whose judge mean is highest: its trainable weights are saved when it is measured (in
RUN/best-judge/, so a resumed run keeps it too) and put back at the end.

A judge is checked before any policy loads: it must be a sequence classifier or reward model, and its
tokenizer must read the policy's text (not mostly its unknown token, no ids beyond its embeddings).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from tunekit.errors import UserError
from tunekit.jsontypes import JsonObject, Metrics
from tunekit.rl.reward_scores import RunScorer

Keep = Literal["last", "best_judge"]
JUDGE_METHODS = ("reward", "classify")
POSITIVE_NAMES = ("1", "positive", "pos")  # a classifier's positive class, unless rlhf.judge_label names it
UNREADABLE = 0.5  # the share of the text's characters read as the unknown token above which a judge is refused
SAMPLES_KEPT = 10  # prompts with their starting and final responses in eval.json
BEST = "best-judge"  # the run folder's subfolder with the best evaluation point's trainable weights


# ---------------------------------------------------------------------------------------------
# Checking a judge run (no model loaded)


def model_folder(run: Path) -> Path:
    return run / "model" if (run / "model").is_dir() else run / "adapter"


def check_judge(run_dir: str, label: str | int | None, texts: list[str], where: str) -> int | None:
    """Refuse, in one line, a judge that is not a finished reward or classify run with a classifier
    head, or whose tokenizer cannot read `texts` (the policy's prompts); the class index whose
    probability is the score (None: a reward model's one output)."""
    from tunekit.files import read_json
    from tunekit.runs.reading import check_finished

    run = Path(run_dir)
    key = f"{where}: rlhf.judge: {run_dir}"
    if not (run / "run.json").is_file():
        raise UserError(f"{key}: not a tunekit run folder; train a judge with `tunekit reward` or `tunekit classify`")
    info = read_json(run / "run.json")
    try:
        check_finished(run, info.get("status"), info.get("reason"))
    except UserError as error:
        raise UserError(f"{where}: rlhf.judge: {error}") from None
    method = info["method"]
    folder = model_folder(run)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    heads = [a for a in config.get("architectures") or [] if a.endswith("ForSequenceClassification")]
    if method not in JUDGE_METHODS or not heads:
        what = f"a `tunekit {method}` run" + ("" if method in JUDGE_METHODS else f" ({', '.join(config.get('architectures') or ['no model'])})")
        raise UserError(f"{key}: {what} without a sequence-classification head; a judge is a `tunekit reward` run "
                        "or a `tunekit classify` run")
    positive = positive_class(config, label, key)
    check_tokenizer(folder, config, texts, key)
    return positive


def positive_class(config: JsonObject, label: str | int | None, key: str) -> int | None:
    """The index of the class whose probability is a classifier's score; None for one output."""
    names = {int(i): str(name) for i, name in (config.get("id2label") or {}).items()}
    if int(config.get("num_labels", len(names) or 1)) == 1 or len(names) <= 1:
        if label is not None:
            raise UserError(f"{key}: one output (a reward model); remove rlhf.judge_label")
        return None
    wanted = [str(label)] if label is not None else list(POSITIVE_NAMES)
    for want in wanted:
        found = [i for i, name in names.items() if name.casefold() == want.casefold()]
        if found:
            return found[0]
    raise UserError(f"{key}: no class {' or '.join(map(repr, wanted))} (classes: {', '.join(names.values())}); "
                    "set rlhf.judge_label to the class whose probability scores a response")


def check_tokenizer(folder: Path, config: JsonObject, texts: list[str], key: str) -> None:
    """The judge's tokenizer against its model (no id past the embeddings) and the policy's text
    (not mostly the unknown token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    size = config.get("vocab_size")
    if size and len(tokenizer) > int(size):
        raise UserError(f"{key}: its tokenizer has {len(tokenizer)} tokens but its model {size} embeddings: "
                        "the tokenizer is not the model's; retrain the judge or save its own tokenizer with it")
    share = unknown_share(tokenizer, texts)
    if share > UNREADABLE:
        raise UserError(f"{key}: its tokenizer reads {share:.0%} of the policy's prompt text as the unknown token "
                        f"{tokenizer.unk_token}; a judge must read the policy's language (train it from a model "
                        "whose tokenizer covers this text)")


def unknown_share(tokenizer: Any, texts: list[str]) -> float:
    """The share of the texts' non-space characters that the tokenizer maps to its unknown token
    (tokens, when the tokenizer gives no character offsets); 0 without an unknown token."""
    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return 0.0
    unknown = total = 0
    for text in texts:
        try:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            spans = encoded["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer: count tokens instead
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            unknown, total = unknown + sum(i == unk for i in ids), total + len(ids)
            continue
        unknown += sum(len(text[a:b].strip()) for i, (a, b) in zip(encoded["input_ids"], spans) if i == unk)
        total += len("".join(text.split()))
    return unknown / max(total, 1)


# ---------------------------------------------------------------------------------------------
# Scoring


class Judge(RunScorer):
    """A judge run's model: the score of each prompt + response, as the reward model scores them
    (a classify run's: the probability of class `positive`)."""


# ---------------------------------------------------------------------------------------------
# Evaluation points during training, and the kept policy


def trainable_state(policy: Any) -> dict[str, Any]:
    """A copy of the policy's trainable weights (the adapter, with LoRA), on the CPU."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in policy.named_parameters() if p.requires_grad}


def point_record(step: int, evaluation: Any) -> JsonObject:
    means = evaluation.means()
    return {"step": step, "eval/proxy": means["reward"], "eval/judge": means["judge"], "eval/kl": means.get("kl", 0.0),
            "eval/response_length": means["response_length"]}


class JudgeTracker:
    """Evaluates the policy every `every` rounds (and after the last) with `measure(policy,
    reference)`, logs the point, and with keep=best_judge keeps the best point's trainable weights."""

    def __init__(self, run: Any, every: int | None, last_step: int, keep: Keep,
                 measure: Callable[[Any, Any], Any]) -> None:
        self.run, self.every, self.last_step, self.keep, self.measure = run, every, last_step, keep, measure
        self.best_step: int | None = None
        self.best_judge = -math.inf
        self.best_weights: dict[str, Any] | None = None
        self.latest: tuple[int, Any] | None = None  # the last point: (step, its Evaluation)
        self.best_evaluation: Any = None

    def start(self, before: Any, resumed_at: int | None) -> None:
        """Step 0 is the starting policy (logged once); a resumed run takes back its best point so far."""
        if resumed_at is None:
            self.run.log(point_record(0, before))
            return
        saved = self.run.path / BEST / "point.json"
        if self.keep == "best_judge" and saved.is_file():
            from safetensors.torch import load_file

            point = json.loads(saved.read_text())
            if point["step"] <= resumed_at:  # a best found after the checkpoint is measured again
                self.best_step, self.best_judge = point["step"], point["judge"]
                self.best_weights = load_file(self.run.path / BEST / "policy.safetensors")

    def due(self, step: int) -> bool:
        return step == self.last_step or bool(self.every and step % self.every == 0)

    def at_step(self, step: int, policy: Any, reference: Any) -> None:
        if not self.due(step):
            return
        import torch

        with torch.random.fork_rng():  # the evaluation's fixed seed must not reset training's sampling
            evaluation = self.measure(policy, reference)
        record = point_record(step, evaluation)
        self.run.log(record)
        self.latest = (step, evaluation)
        if self.keep == "best_judge" and record["eval/judge"] > self.best_judge:
            self.best_step, self.best_judge, self.best_evaluation = step, record["eval/judge"], evaluation
            self.best_weights = trainable_state(policy)
            self.save_best()

    def save_best(self) -> None:
        if not self.run.enabled:
            return
        from safetensors.torch import save

        from tunekit.files import write_atomic, write_json

        folder = self.run.path / BEST
        write_atomic(folder / "policy.safetensors", save(self.best_weights))
        write_json(folder / "point.json", {"step": self.best_step, "judge": self.best_judge})

    def finish(self, policy: Any) -> Any:
        """Put the kept policy's weights back (keep=best_judge); its Evaluation when this run measured
        it (so the final evaluation need not sample again), else None."""
        if self.keep == "best_judge" and self.best_weights is not None:
            import torch

            params = dict(policy.named_parameters())
            with torch.no_grad():
                for name, value in self.best_weights.items():
                    params[name].copy_(value.to(params[name].device))
            return self.best_evaluation
        if self.latest and self.latest[0] == self.last_step:
            return self.latest[1]
        return None


def judge_metrics(before: Any, after: Any, tracker: JudgeTracker | None) -> Metrics:
    """eval.json's judge figures: its mean before and after, the final policy's win rate over the
    starting one (per prompt; ties half) with its standard error, and sample responses."""
    from tunekit.runs.metrics import mean_and_se

    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for b, a in zip(before.judge, after.judge)]
    count = len(wins)
    rate, se = mean_and_se(wins, ddof=1)
    metrics: Metrics = {"judge_before": sum(before.judge) / max(count, 1), "judge_after": sum(after.judge) / max(count, 1),
                        "judge_win_rate": rate, "judge_win_rate_se": se, "judge_prompts": count}
    if tracker is not None and tracker.keep == "best_judge":
        metrics["kept_step"] = tracker.best_step if tracker.best_step is not None else tracker.last_step
    metrics["samples"] = [
        {"prompt": prompt, "start": start, "final": final, "judge_start": round(judge_start, 4),
         "judge_final": round(judge_final, 4), "proxy_start": round(proxy_start, 4), "proxy_final": round(proxy_final, 4)}
        for prompt, start, final, judge_start, judge_final, proxy_start, proxy_final in list(zip(
            before.prompts, before.responses, after.responses, before.judge, after.judge, before.rewards,
            after.rewards))[:SAMPLES_KEPT]]
    return metrics
