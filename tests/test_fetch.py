"""`tunekit data fetch` and the data/ folder the shipped recipes read: offline, from a mirror in a
temporary folder, from file:// URLs, and against a network that refuses every connection."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import MIRROR, ROOT, SHARED, write

from tunekit.data import catalog
from tunekit.data import tables as data
from tunekit.data.catalog import DATASETS, DataFile, Dataset


def one_error_line(result) -> str:
    """Exit code 2 and one error line, last on stderr (after the `ok` lines of files done before)."""
    lines = result.err.strip().splitlines()
    errors = [line for line in lines if ": ok (" not in line]
    assert result.code == 2 and errors == lines[-1:] and lines[-1].startswith("tunekit: error: "), result.err
    return lines[-1]


def test_fetch_from_a_mirror_copies_every_file_checked(cli, tmp_path):
    dest = tmp_path / "data"
    result = cli("data", "fetch", "all", "--from", SHARED, "--to", dest)
    assert result.code == 0, result.err
    assert result.last_line == str(dest)
    for file in (f for d in DATASETS for f in d.files):
        assert hashlib.sha256((dest / file.path).read_bytes()).hexdigest() == file.sha256
    assert not list(dest.rglob("*.tmp"))  # nothing left under a temporary name
    again = cli("data", "fetch", "sst2", "--from", tmp_path / "no-mirror-needed", "--to", dest)
    assert again.code == 2  # a mirror that is not there is refused even when nothing is missing
    again = cli("data", "fetch", "sst2", "--to", dest)  # all there: no download attempted
    assert again.code == 0 and again.err.strip() == f"{dest}: 2 files match their sha256 (0 fetched now)"


def test_a_damaged_mirror_file_is_one_line_and_nothing_is_written(cli, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED / "rte", mirror / "rte")
    damaged = mirror / "rte" / "dev.tsv"
    damaged.write_bytes(damaged.read_bytes().replace(b"not_entailment", b"entailment", 1))
    dest = tmp_path / "data"
    line = one_error_line(cli("data", "fetch", "rte", "--from", mirror, "--to", dest))
    assert f"{damaged}: sha256 " in line and "80230dfa1347" in line and "damaged or another version" in line
    assert (dest / "rte" / "train.tsv").is_file() and not (dest / "rte" / "dev.tsv").exists()
    assert [p.name for p in (dest / "rte").iterdir()] == ["train.tsv"]


def test_a_file_missing_from_the_mirror_is_one_line(cli, tmp_path):
    mirror = tmp_path / "mirror"
    write(mirror / "sst2" / "train.tsv", "sentence\tlabel\n")
    (mirror / "sst2" / "train.tsv").unlink()
    line = one_error_line(cli("data", "fetch", "sst2", "--from", mirror, "--to", tmp_path / "data"))
    assert f"{mirror / 'sst2' / 'train.tsv'}: no such file in the mirror (sst2)" in line


def test_unknown_dataset_and_a_changed_local_file(cli, tmp_path):
    assert "one of sst2, rte, squad" in one_error_line(cli("data", "fetch", "sst3"))
    dest = tmp_path / "data"
    write(dest / "tiny_shakespeare" / "input.txt", "edited by hand\n")
    line = one_error_line(cli("data", "fetch", "tiny_shakespeare", "--from", SHARED, "--to", dest))
    assert "differs from the published file" in line and "--overwrite" in line
    assert (dest / "tiny_shakespeare" / "input.txt").read_text() == "edited by hand\n"
    replaced = cli("data", "fetch", "tiny_shakespeare", "--from", SHARED, "--to", dest, "--overwrite")
    assert replaced.code == 0 and (dest / "tiny_shakespeare" / "input.txt").stat().st_size == 1115394


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_network_is_one_line_that_says_how_else_to_get_the_data(cli, tmp_path, monkeypatch):
    # Every request goes through a proxy that refuses connections: the real download code, no network.
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{closed_port()}")
    line = one_error_line(cli("data", "fetch", "tiny_shakespeare", "--to", tmp_path / "data", "--timeout", "5"))
    assert "tiny_shakespeare: cannot download https://raw.githubusercontent.com/karpathy/char-rnn" in line
    assert "--from DIR" in line and "make data DATA_MIRROR=DIR" in line
    assert not (tmp_path / "data" / "tiny_shakespeare" / "input.txt").exists()


def test_download_from_urls_zip_members_and_the_squad_cut(cli, tmp_path, monkeypatch):
    """The download path end to end, on file:// URLs: a zip member and a SQuAD cut, checked."""
    served = tmp_path / "served"
    served.mkdir()
    dev = (SHARED / "sst2" / "dev.tsv").read_bytes()
    with zipfile.ZipFile(served / "SST-2.zip", "w") as archive:
        archive.writestr("SST-2/dev.tsv", dev)
    squad = served / "train.json"
    shutil.copyfile(SHARED / "squad" / "train-v1.1_first44articles.json", squad)
    cut = json.dumps({"data": json.loads(squad.read_bytes())["data"][:2], "version": "1.1"}, sort_keys=True).encode()
    fake = Dataset("fake", (
        DataFile("fake/dev.tsv", hashlib.sha256(dev).hexdigest(), (served / "SST-2.zip").as_uri(), member="SST-2/dev.tsv"),
        DataFile("fake/squad.json", hashlib.sha256(cut).hexdigest(), squad.as_uri(), first_articles=2),
        DataFile("fake/wrong.json", "0" * 64, squad.as_uri()),
    ))
    monkeypatch.setattr(catalog, "DATASETS", [fake])
    dest = tmp_path / "data"
    line = one_error_line(cli("data", "fetch", "fake", "--to", dest))
    assert line.startswith(f"tunekit: error: {squad.as_uri()}: sha256 ") and "the source changed" in line
    assert (dest / "fake" / "dev.tsv").read_bytes() == dev
    assert (dest / "fake" / "squad.json").read_bytes() == cut
    assert not (dest / "fake" / "wrong.json").exists()


def test_the_squad_cut_gives_the_mirror_file_back_byte_for_byte():
    from tunekit.data.fetch import first_squad_articles

    mirrored = (SHARED / "squad" / "train-v1.1_first44articles.json").read_bytes()
    assert first_squad_articles(mirrored, 44, "x") == mirrored


def data_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in data_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in data_paths(v)]
    return [value] if isinstance(value, str) and value.endswith(data.SUFFIXES + (".gz",)) else []


def test_every_shipped_recipe_reads_catalogued_files_under_data():
    """Recipes name data/..., each a file of data/README.md's table, and nothing outside the project."""
    recipes = [p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate"]
    paths = {str(p): data_paths(yaml.safe_load(p.read_text())) for p in recipes}
    assert sum(map(len, paths.values())) >= 25
    for recipe, specs in paths.items():
        for spec in specs:
            assert spec.startswith("data/"), (recipe, spec)
            known = catalog.dataset_of(ROOT / spec, catalog.DATA_DIR) or catalog.made_by(ROOT / spec, catalog.DATA_DIR)
            assert known is not None, (recipe, spec)
    readme = (ROOT / "data" / "README.md").read_text()
    for file in (f for d in DATASETS for f in d.files):
        assert f"`{file.path}` | `{file.sha256}`" in readme


def test_recipes_read_data_from_any_folder(cli, tmp_path, monkeypatch):
    """data/... is relative to the current folder, then to the project root: from elsewhere too."""
    monkeypatch.chdir(tmp_path)
    result = cli("validate", ROOT / "recipes" / "classify" / "minilm-rte.yaml")
    assert result.code == 0, result.err


def test_a_recipe_whose_data_is_not_fetched_says_how_to_get_it(cli, tmp_path, monkeypatch):
    """A project without data/ yet (a fresh clone): one line naming the file and `make data`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(catalog, "DATA_DIR", tmp_path / "data")
    line = one_error_line(cli("validate", ROOT / "recipes" / "classify" / "minilm-rte.yaml"))
    assert line == ("tunekit: error: data/rte/train.tsv: not found (data.train); "
                    "run `make data` or `tunekit data fetch rte`")
    other = write(tmp_path / "r.yaml", Path(ROOT / "recipes" / "classify" / "minilm-rte.yaml").read_text()
                  .replace("data/rte/train.tsv", "mine/train.tsv"))
    assert "mine/train.tsv: no such file (data.train); check the path" in one_error_line(cli("validate", other))
    arith = one_error_line(cli("validate", ROOT / "recipes" / "sft" / "tiny-gpt-arith.yaml"))
    assert arith == ("tunekit: error: data/arith/train.jsonl: not found (data.train); "
                     "tunekit writes it: run `python -m tunekit.arithmetic data/arith`")


def test_the_mirror_layout_matches_the_catalogue():
    if not MIRROR.is_dir():
        pytest.skip("no mirror here")
    sums = dict(line.split()[::-1] for line in (MIRROR / "SHA256SUMS").read_text().splitlines())
    catalogued = {f"./{f.path}": f.sha256 for d in DATASETS for f in d.files}
    assert catalogued == sums


def test_zip_of_the_glue_layout_is_read_by_member():
    from tunekit.data.fetch import extract

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("RTE/dev.tsv", b"index\tsentence1\tsentence2\tlabel\n")
    file = DataFile("rte/dev.tsv", "", "https://example/RTE.zip", member="RTE/dev.tsv")
    assert extract(buffer.getvalue(), file, Dataset("rte", (file,))).startswith(b"index\t")
    with pytest.raises(Exception, match="not the expected zip archive"):
        extract(b"<html>moved</html>", file, Dataset("rte", (file,)))
