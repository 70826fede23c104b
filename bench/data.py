"""Preprocessing at users' scale: `tunekit sft` on a 1,000,000-row Alpaca-format file and `tunekit
pretrain` on a 1 GB text corpus, up to the dataset the Trainer gets (read, check, tokenise, mask or
pack, cache). Each measurement runs in a child process: wall time, CPU time (the child and its
worker processes) and peak RSS (the child alone, and the largest sum over its process tree, which
counts pages shared by the workers more than once).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/data.py [--rows 1000000] [--corpus-mb 1024]
        [--baseline-rows 100000] [--baseline-corpus-mb 32] [--workdir /tmp/tunekit-bench-data]

Rows: cold (empty cache) and cached (second run), data.num_proc 1 and 2; and "today's path" (the
code of --baseline-rev, extracted from git into the workdir) on a slice small enough for it, with
the new code on the same slice beside it. Finally `tunekit pretrain` trains 2 steps on the whole
corpus from the cache ("training starts"). The files are made in the workdir (never in the
repository): the shipped Alpaca rows, cycled and made unique by a numbered suffix on the
instruction, and tiny-shakespeare repeated. Figures are noisy on a shared machine: the ratios
(cached / cold, num_proc 1 / 2, baseline / new) are what to read; the load is printed with them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / "data"  # filled by `make data`
ALPACA = [SHARED / "alpaca" / "alpaca_small_2k.json", SHARED / "alpaca" / "alpaca_data_1k.json"]
SHAKESPEARE = SHARED / "tiny_shakespeare" / "input.txt"
BASELINE_REV = "3bd1eee"  # main before Arrow preprocessing


def make_alpaca(path: Path, rows: int) -> None:
    """`rows` Alpaca records as JSON lines, written as they are made (never all in memory)."""
    if path.exists():
        return
    shipped = [r for f in ALPACA for r in json.loads(f.read_text())]
    temporary = path.with_suffix(".tmp")
    with temporary.open("w", encoding="utf-8") as out:
        for number, row in zip(range(rows), itertools.cycle(shipped)):
            out.write(json.dumps({**row, "instruction": f"{row['instruction']} (variant {number})"}) + "\n")
    temporary.replace(path)


def make_corpus(path: Path, megabytes: int) -> None:
    if path.exists():
        return
    text = SHAKESPEARE.read_text(encoding="utf-8")
    temporary = path.with_suffix(".tmp")
    with temporary.open("w", encoding="utf-8") as out:
        for copy in itertools.count():
            if out.tell() >= megabytes << 20:
                break
            out.write(f"Copy {copy}.\n\n{text}\n\n")
    temporary.replace(path)


def make_tokenizer(folder: Path) -> None:
    """tunekit's byte-level BPE tokenizer (8k vocabulary, chat template), as the shipped recipes build."""
    if (folder / "tokenizer.json").exists():
        return
    sys.path.insert(0, str(ROOT))
    from tunekit.data.chat import train_tokenizer

    texts = [SHAKESPEARE.read_text(encoding="utf-8")] + [r["instruction"] for f in ALPACA for r in json.loads(f.read_text())]
    train_tokenizer(texts, 8192).save_pretrained(folder)


def sft_raw(data: Path, tokenizer: Path, num_proc: int) -> dict:
    return {"model": {"name": str(tokenizer)},
            "data": {"train": str(data), "eval_size": 200, "num_proc": num_proc, "max_length": 512}}


def pretrain_raw(data: Path, tokenizer: Path, num_proc: int) -> dict:
    return {"model": {"config": {"model_type": "llama"}, "tokenizer": str(tokenizer)},
            "data": {"train": str(data), "block_size": 256, "num_proc": num_proc}}


def child(task: str, raw: dict) -> dict:
    """In the child: preprocess as training would, up to the datasets the Trainer gets."""
    from tunekit.config import validate_config
    from tunekit.methods import pretrain, sft

    module = sft if task in ("sft", "sft-baseline") else pretrain
    config = validate_config(module.Config, raw, "bench")
    data = module.check(config)
    if task == "sft-baseline":  # the old code: Python lists of rows and of token ids, then Dataset.from_list
        from datasets import Dataset

        from tunekit.data.chat import ensure_chat_template
        from tunekit.models import load_tokenizer

        tokenizer = load_tokenizer(config.model)
        ensure_chat_template(tokenizer, config.model.chat_template)
        train = Dataset.from_list(sft.tokenize_split(tokenizer, data.train, config))
        return {"rows": len(train), "tokens": sum(len(x) for x in train["input_ids"])}
    if task == "pretrain-baseline":
        from datasets import Dataset

        tokenizer = pretrain.build_tokenizer(config, data)
        train, _ = pretrain.split_blocks(pretrain.pack(tokenizer, data.train, config.data.block_size),
                                         config.data.eval_fraction, 42)
        train = Dataset.from_list(train)
        return {"rows": len(train), "tokens": len(train) * config.data.block_size}
    prepared = dict(module.prepare(config, data))
    return {"rows": prepared["train"].rows, "tokens": prepared["train"].tokens, "cache": str(prepared["train"].path)}


def measure(label: str, command: list[str], env: dict) -> dict:
    """Run `command` as a child; wall time, CPU time of it and its workers, peak RSS."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=env["PYTHONPATH"])  # `python -c` imports from its folder first
    peak_tree = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        parent = psutil.Process(process.pid)
        while not done.wait(0.2):
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    wall = time.perf_counter() - start
    done.set()
    result = json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else {"error": err.strip()[-400:]}
    result.update(label=label, wall_s=round(wall, 1), peak_tree_mb=round(peak_tree / 2**20))
    return result


def run_child(label: str, task: str, raw: dict, cache: Path, code_root: Path) -> dict:
    env = {**os.environ, "TUNEKIT_CACHE": str(cache), "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(cache / "hf")}
    command = [sys.executable, "-c", CHILD, task, json.dumps(raw)]
    result = measure(label, command, env)
    print(json.dumps(result), flush=True)
    return result


# The child measures its own CPU time (with its waited-for workers) and peak RSS, and prints them.
CHILD = """
import importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("bench_data", %r)  # not on sys.path: bench/peft.py would shadow peft
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
result = bench.child(sys.argv[1], json.loads(sys.argv[2]))
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
result.update(cpu_s=round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 1),
              peak_rss_mb=round(me.ru_maxrss / 1024), worker_peak_rss_mb=round(kids.ru_maxrss / 1024))
print(json.dumps(result))
""".replace("%r", repr(str(Path(__file__).resolve())))


def baseline_tree(workdir: Path, rev: str) -> Path:
    folder = workdir / f"baseline-{rev}"
    if not folder.exists():
        folder.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tunekit"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def head(source: Path, target: Path, rows: int) -> Path:
    if not target.exists():
        with source.open(encoding="utf-8") as lines, target.open("w", encoding="utf-8") as out:
            out.writelines(itertools.islice(lines, rows))
    return target


def head_bytes(source: Path, target: Path, megabytes: int) -> Path:
    if not target.exists():
        with source.open("rb") as data:
            chunk = data.read(megabytes << 20)
        target.write_bytes(chunk[: chunk.rfind(b"\n") + 1])
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--corpus-mb", type=int, default=1024)
    parser.add_argument("--baseline-rows", type=int, default=100_000)
    parser.add_argument("--baseline-corpus-mb", type=int, default=32)
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunekit-bench-data"))
    parser.add_argument("--only", choices=["sft", "pretrain"], default=None)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[2, 1], help="data.num_proc values, in order")
    parser.add_argument("--no-baseline", action="store_true", help="skip today's path on the smaller slice")
    options = parser.parse_args()
    work = options.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"load before: {os.getloadavg()}", flush=True)
    tokenizer = work / "tokenizer"
    make_tokenizer(tokenizer)
    old = None if options.no_baseline else baseline_tree(work, options.baseline_rev)
    results = []
    if options.only in (None, "sft"):
        results += bench_sft(options, work, tokenizer, old)
    if options.only in (None, "pretrain"):
        results += bench_pretrain(options, work, tokenizer, old)
    print(f"load after: {os.getloadavg()}", flush=True)
    table(results)


def cold_then_cached(label: str, task: str, raw: dict, cache: Path) -> list[dict]:
    """The same preprocessing twice in child processes: from an empty cache, then from its result."""
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    return [run_child(f"{label}, {when}", task, raw, cache, ROOT) for when in ("cold", "cached")]


def bench_sft(options: argparse.Namespace, work: Path, tokenizer: Path, old: Path | None) -> list[dict]:
    alpaca = work / f"alpaca-{options.rows}.jsonl"
    make_alpaca(alpaca, options.rows)
    results = []
    for procs in options.num_proc:
        results += cold_then_cached(f"sft {options.rows:,} rows, num_proc {procs}", "sft",
                                    sft_raw(alpaca, tokenizer, procs), work / f"cache-sft-{procs}")
    if options.no_baseline:
        return results
    small = head(alpaca, work / f"alpaca-{options.baseline_rows}.jsonl", options.baseline_rows)
    raw = sft_raw(small, tokenizer, 1)
    del raw["data"]["num_proc"]  # the old code does not know it
    results.append(run_child(f"sft {options.baseline_rows:,} rows, today's path ({options.baseline_rev})",
                             "sft-baseline", raw, work / "cache-base", old))
    subprocess.run(["rm", "-rf", str(work / "cache-small")], check=True)
    results.append(run_child(f"sft {options.baseline_rows:,} rows, num_proc 1, cold", "sft",
                             sft_raw(small, tokenizer, 1), work / "cache-small", ROOT))
    return results


def bench_pretrain(options: argparse.Namespace, work: Path, tokenizer: Path, old: Path | None) -> list[dict]:
    corpus = work / f"corpus-{options.corpus_mb}mb.txt"
    make_corpus(corpus, options.corpus_mb)
    results = []
    for procs in options.num_proc:
        cache = work / f"cache-pretrain-{procs}"
        results += cold_then_cached(f"pretrain {options.corpus_mb} MB, num_proc {procs}", "pretrain",
                                    pretrain_raw(corpus, tokenizer, procs), cache)
    results.append(train_starts(corpus, tokenizer, cache, work))
    if options.no_baseline:
        return results
    small = head_bytes(corpus, work / f"corpus-{options.baseline_corpus_mb}mb.txt", options.baseline_corpus_mb)
    raw = pretrain_raw(small, tokenizer, 1)
    del raw["data"]["num_proc"]
    results.append(run_child(f"pretrain {options.baseline_corpus_mb} MB, today's path ({options.baseline_rev})",
                             "pretrain-baseline", raw, work / "cache-base", old))
    subprocess.run(["rm", "-rf", str(work / "cache-small-pt")], check=True)
    results.append(run_child(f"pretrain {options.baseline_corpus_mb} MB, num_proc 1, cold", "pretrain",
                             pretrain_raw(small, tokenizer, 1), work / "cache-small-pt", ROOT))
    return results


def train_starts(corpus: Path, tokenizer: Path, cache: Path, work: Path) -> dict:
    """`tunekit pretrain` on the whole corpus, 2 steps, from the cache the runs above left."""
    recipe = work / "pretrain-bench.yaml"
    recipe.write_text(json.dumps({
        "method": "pretrain",
        "model": {"tokenizer": str(tokenizer), "config": {"model_type": "llama", "hidden_size": 64,
                  "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "max_position_embeddings": 256}},
        "data": {"train": str(corpus), "block_size": 256, "num_proc": 2, "eval_fraction": 0.0001},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no", "eval_strategy": "no",
                  "per_device_eval_batch_size": 64},
    }))
    env = {**os.environ, "TUNEKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-c", "import json, resource, subprocess, sys\n"
               "code = subprocess.run(sys.argv[1:]).returncode\n"
               "kids = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
               "print(json.dumps({'exit': code, 'cpu_s': round(kids.ru_utime + kids.ru_stime, 1), "
               "'peak_rss_mb': round(kids.ru_maxrss / 1024)}))",
               sys.executable, "-m", "tunekit", "pretrain", str(recipe), "-o", str(work / "run-pretrain"), "--overwrite"]
    result = measure("tunekit pretrain, 2 steps on the whole corpus (cached blocks)", command, env)
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> None:
    print("\n| measurement | rows (blocks) | tokens | wall s | CPU s | peak RSS MB (child) | peak RSS MB (tree) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['label']} | failed: {r['error'][-200:]} | | | | | |")
            continue
        print(f"| {r['label']} | {r.get('rows', '')} | {r.get('tokens', '')} | {r['wall_s']} | {r.get('cpu_s', '')} | "
              f"{r.get('peak_rss_mb', '')} | {r['peak_tree_mb']} |")


if __name__ == "__main__":
    main()
