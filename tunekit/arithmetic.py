"""Seeded arithmetic word problems with answers: tunekit's own data for the verifiable-reward chain
(examples/arith.mk): pre-train the tiny GPT on worked problems, SFT it on problem -> worked answer,
then GRPO / PPO with the `exact_answer` reward.

Two levels of difficulty, each written to a folder of its own with the same files and columns:

- easy (the default): a two-digit number plus or minus a one-digit number, in a handful of sentence
  templates. The tiny GPT of examples/arith.mk, pre-trained on them, then SFT'd, answers ~97% of the
  held-out ones greedily (with two two-digit numbers it learnt to copy the operands but no better
  than chance at the digits); a LoRA-SFT'd SmolLM2 80-88%. Either way RL has little to add here.
- hard: two-step problems (`a + b - c`, `a - b + c`, `a + b + c`, `a - b - c`) of a three-digit
  number (200-999) and two two-digit ones, and one-step sums and differences of two three-digit
  numbers, worked one equation per step (`347 + 28 = 375. 375 - 56 = 319. The answer is 319.`);
  no intermediate or final result is negative.

Every problem is one draw from one seeded generator; the held-out set's key (the operations and the
operands) never occurs in the training or pre-training sets, so a held-out answer cannot be
recalled, only computed. The easy files are byte for byte what this module wrote before `hard`
existed (tests/test_arithmetic.py holds their sha256).

    python -m tunekit.arithmetic data/arith                       # train.jsonl, heldout.jsonl, pretrain.jsonl
    python -m tunekit.arithmetic data/arith-hard --difficulty hard
    python -m tunekit.arithmetic data/arith --report runs/rlhf-*   # accuracy before / after, CPU minutes
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tunekit.files import write_atomic
from tunekit.jsontypes import Row

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jill", "Kai", "Lena")
ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards", "eggs", "nails")

# (operation, template): the question, with {name}, {item}, {a}, {b}
TEMPLATES = (
    ("+", "{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"),
    ("+", "A shop sold {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did it sell in all?"),
    ("+", "There are {a} {item} in one box and {b} {item} in another. How many {item} are there in total?"),
    ("-", "{name} has {a} {item}. {name} gives away {b}. How many {item} are left?"),
    ("-", "A box holds {a} {item}. {b} {item} are taken out. How many {item} remain in the box?"),
    ("-", "{name} needs {a} {item} and already has {b}. How many more {item} does {name} need?"),
)
# hard: (operations, template) with {name}, {item}, {a}, {b} and, for two steps, {c}
HARD_TEMPLATES = (
    ("+-", "{name} has {a} {item}. {name} gets {b} more and then gives away {c}. How many {item} does {name} have now?"),
    ("+-", "A shop had {a} {item}. It received {b} more and sold {c}. How many {item} does it have left?"),
    ("-+", "A box holds {a} {item}. {b} {item} are taken out and {c} are put in. How many {item} are in the box now?"),
    ("-+", "{name} has {a} {item}, gives away {b} and then finds {c}. How many {item} does {name} have now?"),
    ("++", "There are {a} {item} in one box, {b} in another and {c} in a third. How many {item} are there in total?"),
    ("--", "{name} has {a} {item}, gives {b} to a friend and loses {c}. How many {item} are left?"),
    ("+", "A shop sold {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did it sell in all?"),
    ("-", "A store had {a} {item} and sold {b}. How many {item} remain?"),
)
MARKER = "The answer is"
EQUATION = re.compile(r"(\d+) ([+-]) (\d+) = (-?\d+)")
DIFFICULTIES = ("easy", "hard")


@dataclass(frozen=True)
class Problem:
    question: str
    worked: str  # "347 + 128 = 475. The answer is 475."
    answer: str
    key: tuple[str | int, ...]  # (operations, operands...): what makes two problems the same sum

    def row(self) -> dict[str, str]:
        return {"prompt": self.question, "completion": self.worked, "answer": self.answer}


def draw(rng: random.Random) -> Problem:
    op, template = rng.choice(TEMPLATES)
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    result = a + b if op == "+" else a - b
    question = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    worked = f"{a} {op} {b} = {result}. {MARKER} {result}."
    return Problem(question, worked, str(result), (op, a, b))


def apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y


def draw_hard(rng: random.Random) -> Problem:
    """A two-step problem of a three-digit and two two-digit numbers, or a one-step one of two
    three-digit numbers. No step goes below zero: a >= 200 stays above two two-digit subtractions,
    and a one-step difference takes b <= a."""
    ops, template = rng.choice(HARD_TEMPLATES)
    a = rng.randint(200, 999)
    b = rng.randint(10, 99) if len(ops) == 2 else rng.randint(100, a if ops == "-" else 999)
    steps, total = [f"{a} {ops[0]} {b} = {apply(ops[0], a, b)}."], apply(ops[0], a, b)
    operands: tuple[int, ...] = (a, b)
    if len(ops) == 2:
        c = rng.randint(10, 99)
        steps.append(f"{total} {ops[1]} {c} = {apply(ops[1], total, c)}.")
        total, operands = apply(ops[1], total, c), (a, b, c)
    question = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b, c=operands[-1])
    worked = " ".join(steps) + f" {MARKER} {total}."
    return Problem(question, worked, str(total), (ops, *operands))


def make(seed: int, train: int, heldout: int, pretrain: int, equations: int = 0,
         difficulty: str = "easy") -> dict[str, list[Problem]]:
    """Held-out problems first (distinct sums), then training and pre-training problems whose sums are
    not held out. The same seed, sizes and difficulty give the same problems."""
    next_problem = draw_hard if difficulty == "hard" else draw
    rng = random.Random(seed)
    held: dict[tuple[str | int, ...], Problem] = {}
    while len(held) < heldout:
        problem = next_problem(rng)
        held.setdefault(problem.key, problem)
    sets: dict[str, list[Problem]] = {"heldout": list(held.values()), "train": [], "pretrain": [], "equations": []}
    for name, count in (("train", train), ("pretrain", pretrain), ("equations", equations)):
        while len(sets[name]) < count:
            problem = next_problem(rng)
            if problem.key not in held:
                sets[name].append(problem)
    return sets


def worked_steps(prompts: list[str], responses: list[str], rows: list[Row]) -> list[float]:
    """A reward function for `rlhf.reward_fn` (`name: tunekit.arithmetic:worked_steps`): the share of
    the row's worked steps (the equations of its `completion`) that the response writes in the same
    place, so a two-step answer with its first step right earns 0.5 where `exact_answer` gives 0.
    Partial credit against the reference, not for any true equation: writing `1 + 1 = 2` earns
    nothing. With few problems right, most GRPO groups are all 0 under `exact_answer` and teach
    nothing; this one gives them a gradient towards the first step."""
    scores = []
    for response, row in zip(responses, rows):
        wanted = EQUATION.findall(str(row.get("completion", "")))
        written = EQUATION.findall(response)
        scores.append(sum(w == g for w, g in zip(wanted, written)) / len(wanted) if wanted else 0.0)
    return scores


def write(folder: Path, seed: int = 0, train: int = 4000, heldout: int = 500, pretrain: int = 20000,
          equations: int = 100000, difficulty: str = "easy") -> list[Path]:
    """train.jsonl and heldout.jsonl (prompt, completion, answer) and pretrain.jsonl (text: worked
    problems, and bare equations `63 - 5 = 58.` that give the small model many more sums to learn
    from per token, shuffled together), each written atomically (tunekit.files), and only when its
    bytes change: the chains' makefiles rerun this after any edit of this module, and an unchanged
    file must not look new to the steps trained on it."""
    folder.mkdir(parents=True, exist_ok=True)
    sets = make(seed, train, heldout, pretrain, equations, difficulty)
    texts = [f"{p.question} {p.worked}" for p in sets.pop("pretrain")]
    texts += [p.worked.split(f" {MARKER}")[0] for p in sets.pop("equations")]  # the worked steps alone
    random.Random(seed).shuffle(texts)
    written = []
    for name, rows in (("heldout", [p.row() for p in sets["heldout"]]), ("train", [p.row() for p in sets["train"]]),
                       ("pretrain", [{"text": t} for t in texts])):
        path = folder / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not (path.is_file() and path.read_text() == text):  # the same bytes keep their mtime: make retrains nothing
            write_atomic(path, text)
        written.append(path)
    return written


def report(run: Path) -> str:
    """One line: an RL run's held-out exact-answer accuracy before and after, and the CPU minutes
    (user + system) of the step, from the `/usr/bin/time -v` report in its time.txt."""
    from tunekit.arith_table import cpu_and_memory

    metrics = json.loads((run / "eval.json").read_text())
    line = f"{run}: held-out exact_answer {metrics['exact_answer_before']:.3f} -> {metrics['exact_answer_after']:.3f}"
    timing = cpu_and_memory(run / "time.txt")
    if timing:
        line += f", {timing[0]:.1f} CPU minutes"
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tunekit.arithmetic", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where train.jsonl, heldout.jsonl and pretrain.jsonl go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4000, help="problems for SFT and RL")
    parser.add_argument("--heldout", type=int, default=500, help="held-out problems (sums never in training)")
    parser.add_argument("--pretrain", type=int, default=20000, help="worked problems as pre-training text")
    parser.add_argument("--equations", type=int, default=100000, help="bare equations as pre-training text")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="easy",
                        help="easy: 2-digit +/- 1-digit; hard: two-step problems of 2-3 digit numbers "
                             "(write them to a folder of their own, e.g. data/arith-hard)")
    parser.add_argument("--report", type=Path, nargs="+", help="instead: print RL runs' accuracy before / after")
    args = parser.parse_args(argv)
    if args.report:
        for run in args.report:
            print(report(run))
        return
    for path in write(args.folder, args.seed, args.train, args.heldout, args.pretrain, args.equations, args.difficulty):
        print(path)


if __name__ == "__main__":
    main()
