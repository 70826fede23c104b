"""The command line: fast help, one-line errors with exit code 2, recipes listing."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_help_does_not_import_torch():
    """`tunekit --help` must answer at once: importing the CLI may not pull in torch."""
    code = "import sys; from tunekit.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_help_lists_commands(cli):
    result = cli("--help")
    assert result.code == 0
    for command in ("classify", "lora", "eval", "predict", "recipes", "validate"):
        assert command in result.out


def test_missing_recipe_is_one_line(cli, tmp_path):
    result = cli("classify", tmp_path / "nope.yaml")
    assert result.code == 2
    assert result.err.strip().count("\n") == 0
    assert "no such recipe file" in result.err


def test_bad_override_is_exit_2(cli):
    result = cli("classify", "classify/minilm-sst2", "--set", "train.lerning_rate=1", "--dry-run")
    assert result.code == 2
    assert "train.lerning_rate: unknown key; did you mean learning_rate?" in result.err
    assert "Traceback" not in result.err


def test_eval_on_a_folder_that_is_not_a_run(cli, tmp_path):
    result = cli("eval", tmp_path, "--data", tmp_path / "x.tsv")
    assert result.code == 2 and "not a tunekit run folder" in result.err


def test_recipes_lists_shipped_recipes(cli):
    result = cli("recipes")
    assert result.code == 0 and "classify/minilm-sst2" in result.out


def test_console_script_exit_code_without_traceback(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "tunekit", "classify", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_recipes_json_show_and_copy(cli, tmp_path):
    import json

    listed = json.loads(cli("recipes", "--json").last_line)
    assert {"name": "sft/tiny-gpt-alpaca"}.items() <= next(r for r in listed if r["name"] == "sft/tiny-gpt-alpaca").items()
    shown = cli("recipes", "show", "sft/tiny-gpt-alpaca")
    assert shown.code == 0 and shown.out.startswith("# tunekit sft recipes/sft/tiny-gpt-alpaca.yaml")
    copied = cli("recipes", "cp", "sft/tiny-gpt-alpaca", tmp_path)
    assert copied.code == 0 and (tmp_path / "tiny-gpt-alpaca.yaml").read_text() == shown.out
    assert cli("recipes", "cp", "sft/tiny-gpt-alpaca", tmp_path).code == 2  # never overwrites


def test_doctor_runs_offline(cli):
    import json

    report = json.loads(cli("doctor", "--json").last_line)
    assert report["versions"]["transformers"] and "offline" in report["hub"]
    assert cli("doctor").code == 0


def test_runs_lists_run_folders(cli, tmp_path):
    import json

    run = tmp_path / "classify-x"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"method": "classify", "status": "done", "base_model": "m", "wall_time_s": 3.5}))
    (run / "eval.json").write_text(json.dumps({"f1_macro": 0.5, "accuracy": 0.75}))
    rows = json.loads(cli("runs", tmp_path, "--json").last_line)
    assert rows == [{"run": str(run), "method": "classify", "base_model": "m", "status": "done",
                     "metric": "accuracy", "value": 0.75, "wall_time_s": 3.5, "exports": None}]
    table = cli("runs", tmp_path).out
    assert "accuracy" in table and "0.75" in table and "done" in table
