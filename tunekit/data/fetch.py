"""`tunekit data fetch`: put the recipes' public datasets (tunekit/data/catalog.py) into data/, from their
official download or from a local mirror with the same layout, each file checked by sha256.

A file is written under a temporary name in its folder and renamed into place only once its sha256
is right, so data/ never holds a half-written or wrong file under a real name. A file already there
with the right sha256 is left alone, so `make data` costs a few checksums when nothing is missing.
The files are at most a few tens of MB, so each is checked in memory before it is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tunekit.data import catalog
from tunekit.data.catalog import DATA_DIR, DataFile, Dataset
from tunekit.errors import UserError
from tunekit.files import write_atomic

MIRROR_HINT = "copy the data from a mirror: `tunekit data fetch {name} --from DIR` (`make data DATA_MIRROR=DIR`)"


def fetch(
    names: list[str], mirror: Path | None = None, dest: Path = DATA_DIR, timeout: float = 60.0,
    overwrite: bool = False, say: Callable[[str], None] = print,
) -> None:
    """Fetch the named datasets ("all" for every one) into `dest`; `say` gets a line per file fetched
    and a last one with the counts."""
    if mirror is not None and not mirror.is_dir():
        raise UserError(f"{mirror}: no such folder (--from); give a mirror folder with the layout of data/")
    checked = fetched = 0
    for dataset in selected(names):
        downloads: dict[str, bytes] = {}  # one download per URL (SST-2's two files share a zip)
        for file in dataset.files:
            target = dest / file.path
            checked += 1
            if present(target, file, overwrite):
                continue
            if mirror is not None:
                source = mirror / file.path
                write_checked(read_mirror(source, dataset), target, file, str(source),
                              "the mirror's copy is damaged or another version")
                say(f"{target}: ok (copied from {source})")
            else:
                if file.url not in downloads:
                    downloads[file.url] = download(file.url, dataset, timeout)
                write_checked(extract(downloads[file.url], file, dataset), target, file, file.url,
                              "the source changed; " + MIRROR_HINT.format(name=dataset.name))
                say(f"{target}: ok (downloaded from {file.url})")
            fetched += 1
    say(f"{dest}: {checked} files match their sha256 ({fetched} fetched now)")


def selected(names: list[str]) -> list[Dataset]:
    known = ", ".join(d.name for d in catalog.DATASETS)
    if not names:
        raise UserError(f"data fetch: name a dataset ({known}) or all")
    if "all" in names:
        return list(catalog.DATASETS)
    chosen = []
    for name in names:
        dataset = catalog.dataset_named(name)
        if dataset is None:
            raise UserError(f"{name}: no such dataset; one of {known}, or all")
        chosen.append(dataset)
    return chosen


def present(target: Path, file: DataFile, overwrite: bool) -> bool:
    """Whether the right file is there already; a different one is replaced only with --overwrite."""
    if not target.is_file():
        return False
    if sha256_of(target) == file.sha256:
        return True
    if overwrite:
        return False
    raise UserError(f"{target}: differs from the published file (sha256); move it aside or pass --overwrite to replace it")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_mirror(source: Path, dataset: Dataset) -> bytes:
    try:
        return source.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{source}: no such file in the mirror ({dataset.name}); a mirror has the layout of data/README.md") from None
    except OSError as err:
        raise UserError(f"{source}: cannot read ({err.strerror}) ({dataset.name})") from None


def download(url: str, dataset: Dataset, timeout: float) -> bytes:
    """The bytes at `url`, or one line saying what failed and how else to get the data."""
    hint = "check the network, or " + MIRROR_HINT.format(name=dataset.name)
    request = urllib.request.Request(url, headers={"User-Agent": "tunekit-data-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        reason = reason_of(err.reason)
    except OSError as err:  # timeouts and connections cut mid-transfer
        reason = reason_of(err)
    raise UserError(f"{dataset.name}: cannot download {url} ({reason}); {hint}")


def reason_of(err: object) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def extract(raw: bytes, file: DataFile, dataset: Dataset) -> bytes:
    """The file's bytes out of what its URL gave: a zip member, a SQuAD cut, or the download itself."""
    if file.member is not None:
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                raw = archive.read(file.member)
        except (zipfile.BadZipFile, KeyError) as err:
            raise UserError(f"{file.url}: not the expected zip archive ({err}); the source changed: "
                            + MIRROR_HINT.format(name=dataset.name)) from None
    if file.first_articles is not None:
        raw = first_squad_articles(raw, file.first_articles, file.url)
    return raw


def first_squad_articles(raw: bytes, count: int, source: str) -> bytes:
    """The first `count` articles of a SQuAD file, written as the mirror's cut is (keys sorted,
    JSON's default ASCII escapes, no newline at the end)."""
    try:
        squad = json.loads(raw)
        return json.dumps({"data": squad["data"][:count], "version": squad["version"]}, sort_keys=True).encode()
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{source}: not a SQuAD JSON file; the download was cut short or the source changed") from None


def write_checked(raw: bytes, target: Path, file: DataFile, origin: str, hint: str) -> None:
    got = hashlib.sha256(raw).hexdigest()
    if got != file.sha256:
        raise UserError(f"{origin}: sha256 {got} is not the published {file.sha256} of {file.path}; {hint}")
    write_atomic(target, raw)
