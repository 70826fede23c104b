"""The public datasets that the shipped recipes read, as one typed list: where each file comes from
and the sha256 it must have. `tunekit data fetch` (tunekit/data/fetch.py) fills the project's `data/`
folder from it, and a recipe whose file is missing there is told which dataset to fetch.
data/README.md describes the same datasets for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
GLUE = "https://dl.fbaipublicfiles.com/glue/data"
SQUAD = "https://rajpurkar.github.io/SQuAD-explorer/dataset"


@dataclass(frozen=True)
class DataFile:
    """One file under data/, and how to get its exact bytes from the public source."""

    path: str  # relative to data/, the same in every mirror (e.g. "sst2/train.tsv")
    sha256: str
    url: str  # the official download; a zip archive when `member` is set
    member: str | None = None  # the file inside the zip archive at `url`
    first_articles: int | None = None  # SQuAD: keep the first N articles of the downloaded file


@dataclass(frozen=True)
class Dataset:
    name: str  # the folder under data/, and the name `tunekit data fetch` takes
    files: tuple[DataFile, ...]


DATASETS: list[Dataset] = [
    Dataset("sst2", (
        DataFile("sst2/train.tsv", "5c47819a1d04cfabc7afcc79a919c97b0b367101ad42d3ff148d67bf501384c2",
                 f"{GLUE}/SST-2.zip", member="SST-2/train.tsv"),
        DataFile("sst2/dev.tsv", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
                 f"{GLUE}/SST-2.zip", member="SST-2/dev.tsv"),
    )),
    Dataset("rte", (
        DataFile("rte/train.tsv", "81d25e323e1ab5b2ad7cd445f1a69db89f2b1c104f3e26915a9421aa4a5f4735",
                 f"{GLUE}/RTE.zip", member="RTE/train.tsv"),
        DataFile("rte/dev.tsv", "80230dfa1347282e7b532b06a1004a76a710087541189bf874223ddf0e3819fb",
                 f"{GLUE}/RTE.zip", member="RTE/dev.tsv"),
    )),
    Dataset("squad", (
        DataFile("squad/train-v1.1_first44articles.json", "e7853905d95f255090f58a2af5221c7f2b296934f8a6c1d77b36df4686f0d828",
                 f"{SQUAD}/train-v1.1.json", first_articles=44),
        DataFile("squad/dev-v1.1.json", "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
                 f"{SQUAD}/dev-v1.1.json"),
    )),
    # Two random subsets of Stanford Alpaca, published by others on GitHub (pinned to a commit):
    # Stanford publishes only the whole 52,002-row file, and the draws were not recorded.
    Dataset("alpaca", (
        DataFile("alpaca/alpaca_data_1k.json", "308ff96375b5a08f7ebf0c763aaf02f7436beb974a28f868eba9823919e6b74c",
                 "https://raw.githubusercontent.com/wujindou/BLOOM-LORA/"
                 "f9876f2dc53a625f3066236cb1f17dbdae6ea4fc/data/alpaca_data_1k.json"),
        DataFile("alpaca/alpaca_small_2k.json", "da78d2d54637d8b7e210d1db495da09c0de3ac21067aefafef5da58586b45ce3",
                 "https://raw.githubusercontent.com/Antelofski/alpaca-lora/"
                 "4ca2c8ba1d946f7a2f0c6b5dcd1b54159850c8d3/alpaca_small.json"),
        DataFile("alpaca/DATA_LICENSE", "d0661a893a508739e49514a80f7629633846f1f4ac889fcf638c94a15ff92e9c",
                 "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/DATA_LICENSE"),
    )),
    Dataset("hh_rlhf", (
        # GitHub keeps this file in LFS (raw.githubusercontent.com serves a pointer): the Hub copy.
        DataFile("hh_rlhf/helpful-base_test.jsonl.gz", "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b",
                 "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/test.jsonl.gz"),
        DataFile("hh_rlhf/LICENSE", "d4fb18db48757e273261a5597b8a09381de8073da060474ce33d0643e06c875e",
                 "https://raw.githubusercontent.com/anthropics/hh-rlhf/master/LICENSE"),
    )),
    Dataset("tiny_shakespeare", (
        DataFile("tiny_shakespeare/input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                 "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
    )),
]


# Data that tunekit writes itself (seeded: the same files every time), nothing to download: the
# folder under data/ and the command that writes it.
MADE: dict[str, str] = {"arith": "python -m tunekit.arithmetic data/arith",
                         "arith-hard": "python -m tunekit.arithmetic data/arith-hard --difficulty hard"}


def under_data(path: Path, data_dir: Path) -> Path | None:
    """The path relative to data/ (None for a path outside it)."""
    try:
        return path.resolve().relative_to(data_dir.resolve())
    except ValueError:
        return None


def made_by(path: Path, data_dir: Path) -> str | None:
    """The command that writes a file under data/ that tunekit makes itself (None for any other)."""
    relative = under_data(path, data_dir)
    return MADE.get(relative.parts[0]) if relative is not None and len(relative.parts) > 1 else None


def dataset_named(name: str) -> Dataset | None:
    return next((d for d in DATASETS if d.name == name), None)


def dataset_of(path: Path, data_dir: Path) -> Dataset | None:
    """The dataset a file under data/ belongs to (None for any other path)."""
    relative = under_data(path, data_dir)
    if relative is None:
        return None
    return next((d for d in DATASETS if any(f.path == relative.as_posix() for f in d.files)), None)


def missing_file_message(spec: str, key: str) -> str:
    """The one line for a data file that is not there. For a file of the shipped recipes' datasets
    it says how to get it; relative paths are tried from the current folder and from the project
    root, as data.read_table reads them."""
    for candidate in (Path(spec), DATA_DIR.parent / spec):
        dataset = dataset_of(candidate, DATA_DIR)
        if dataset is not None:
            return f"{spec}: not found ({key}); run `make data` or `tunekit data fetch {dataset.name}`"
        command = made_by(candidate, DATA_DIR)
        if command is not None:
            return f"{spec}: not found ({key}); tunekit writes it: run `{command}`"
    return f"{spec}: no such file ({key}); check the path (relative paths start at the current folder)"
