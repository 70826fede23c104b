"""The `grpo:` section: TRL's GRPO variants reach GRPOConfig (and RLOOConfig, where it has them)
unchanged; its defaults are TRL's; a wrong value, or an option the algorithm does not read, is one
line and exit 2; grpo.num_iterations and ppo.epochs are one setting."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from conftest import write

from tunekit.config import load_config, parse_yaml, to_yaml, validate_config
from tunekit.methods import rlhf
from tunekit.rl.trl_algos import GrpoSection, trl_arguments

RECIPE = "rlhf/tiny-gpt-arith-grpo"  # its dry run needs no model: the SFT run it names may not exist yet
OPTIONS = {"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "scale_rewards": "batch",
           "epsilon_high": 0.28, "mask_truncated_completions": True}


def arguments(tmp_path, *overrides):
    config = load_config(rlhf.Config, RECIPE, ["train.use_cpu=true", *overrides])
    return config, trl_arguments(config, SimpleNamespace(path=tmp_path / "args"))


def test_every_option_reaches_grpo_config(tmp_path):
    config, args = arguments(tmp_path, *(f"grpo.{k}={v}" for k, v in OPTIONS.items()), "grpo.num_iterations=3",
                             "ppo.epochs=3")
    assert {key: getattr(args, key) for key in OPTIONS} == OPTIONS
    assert args.num_iterations == 3 and config.ppo.epochs == 3
    per_round = config.ppo.rollout_batch_size // config.ppo.minibatch_size
    assert args.max_steps == config.ppo.steps * per_round * 3  # the passes count in the step budget


def test_rloo_gets_the_options_it_has(tmp_path):
    _, args = arguments(tmp_path, "rlhf.algo=rloo", "grpo.epsilon_high=0.3", "grpo.mask_truncated_completions=true")
    assert type(args).__name__ == "RLOOConfig"
    assert args.epsilon_high == 0.3 and args.mask_truncated_completions is True


def test_the_defaults_are_trls(tmp_path):
    from trl import GRPOConfig

    _, args = arguments(tmp_path)
    trl_defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for key in OPTIONS:  # epsilon_high None: the trainer takes epsilon (ppo.clip_range)
        assert getattr(args, key) == GrpoSection.model_fields[key].default == trl_defaults[key], key


@pytest.mark.parametrize(("given", "read"), [(True, "group"), (False, "none"), ("none", "none")])
def test_scale_rewards_reads_booleans_as_trl_does(given, read):
    assert GrpoSection(scale_rewards=given).scale_rewards == read


def test_num_iterations_sets_ppo_epochs_and_the_resolved_config_reads_back(tmp_path):
    recipe = write(tmp_path / "r.yaml", "method: rlhf\nmodel: {name: x}\ndata: {train: a.jsonl, eval_size: 1}\n"
                                        "rlhf: {algo: grpo, reward_fn: exact_answer}\ngrpo: {num_iterations: 2}\n")
    config = load_config(rlhf.Config, str(recipe))
    assert config.ppo.epochs == 2 and config.grpo.num_iterations == 2
    assert rlhf.Config.model_fields["ppo"].default.epochs == 4  # the shared default is not the one changed
    assert load_config(rlhf.Config, str(recipe), ["grpo.num_iterations=null"]).ppo.epochs == 4
    again = validate_config(rlhf.Config, parse_yaml(to_yaml(config)), "config.yaml")  # as a run folder's config
    assert again.ppo.epochs == 2 and again.grpo == config.grpo


def test_an_rloo_runs_config_reads_back(tmp_path):
    config = load_config(rlhf.Config, RECIPE, ["rlhf.algo=rloo", "grpo.epsilon_high=0.3"])
    assert validate_config(rlhf.Config, parse_yaml(to_yaml(config)), "config.yaml").grpo.epsilon_high == 0.3


@pytest.mark.parametrize(("override", "expected"), [
    ("grpo.loss_type=drgrpo", "grpo.loss_type: Input should be 'grpo', 'dr_grpo', 'dapo'"),
    ("grpo.importance_sampling_level=sentence", "grpo.importance_sampling_level: Input should be 'token' or 'sequence'"),
    ("grpo.scale_rewards=std", "grpo.scale_rewards: Input should be 'group', 'batch' or 'none'"),
    ("grpo.epsilon_high=0", "grpo.epsilon_high: Input should be greater than 0"),
    ("grpo.num_iterations=0", "grpo.num_iterations: Input should be greater than 0"),
    ("grpo.mask_truncated_completion=true", "grpo.mask_truncated_completion: unknown key; did you mean mask_truncated_completions?"),
    ("grpo.loss_type=luspo", "grpo: loss_type luspo is a sequence-level loss; set importance_sampling_level: sequence"),
    ("grpo.num_iterations=2", "grpo.num_iterations: 2, but ppo.epochs: 1; they are one setting"),
])
def test_wrong_values_are_one_line_exit_2(cli, override, expected):
    result = cli("rlhf", RECIPE, "--dry-run", "--set", override)
    assert result.code == 2 and expected in result.err and result.err.count("\n") == 1, result.err


@pytest.mark.parametrize(("algo", "option", "refused"), [
    ("rloo", "loss_type=dr_grpo", True), ("rloo", "importance_sampling_level=sequence", True),
    ("rloo", "scale_rewards=none", True), ("rloo", "epsilon_high=0.28", False),
    ("ppo", "epsilon_high=0.28", True), ("ppo", "mask_truncated_completions=true", True),
    ("ppo", "num_iterations=1", True), ("ppo", "loss_type=dapo", False),  # TRL's default changes nothing
])
def test_an_option_the_algo_does_not_read_is_refused(cli, algo, option, refused):
    result = cli("validate", RECIPE, "--set", f"rlhf.algo={algo}", "--set", f"grpo.{option}")
    key = option.split("=")[0]
    if refused:
        assert result.code == 2 and result.err.count("\n") == 1, result.err
        assert f"grpo.{key}: not read by rlhf.algo {algo}" in result.err, result.err
    else:
        assert result.code == 0, result.err
