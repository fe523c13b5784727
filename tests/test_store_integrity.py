"""Issue 22: the result store and result files are verified, recomputed when bad, and never
half-written or lost on overwrite.

- a stored result with a truncated / flipped / missing file, a deleted, garbage or
  future-format ``job.json`` is detected, computed again by the runner, reported (log warning
  and ``RunSummary.invalid``), and ``mechicl runs``' table lists it instead of crashing;
- format-1 entries (written before issue 22, like the lead's stores) verify through the result
  folder's own checksums and are read without being rewritten;
- overwriting (``atomic_path``, ``ResultStore.put(replace=True)``) keeps the old result when the
  second rename fails or the process is killed (SIGKILL) mid-commit;
- result files: a report's pages are checksummed, an unreadable safetensors is a ResultError, a
  seed folder (``--reuse``) with a corrupt part is not reused, an index of another format is
  refused.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mechicl._io as io
from mechicl.analyses.induction import ScanResult
from mechicl.experiments.grid import parse_grid
from mechicl.experiments.runner import run_grid, run_jobs
from mechicl.experiments.store import (
    FORMAT_VERSION,
    ResultStore,
    read_index,
    read_tree,
    write_index,
)
from mechicl.results import (
    HeadScores,
    ResultError,
    load_result,
    read_result,
    verify_result,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]
KEY = "ab" * 32
MODEL = {"name": "m", "weights_sha256": "w" * 64, "tokenizer_sha256": "t" * 64}


def heads(value: float = 0.036) -> HeadScores:
    return HeadScores.from_per_seed("s", torch.full((2, 3, 4), value), params={"a": 1},
                                    model=MODEL)


def result_files(result, tmp_path: Path) -> dict[str, bytes]:
    folder = result.save(tmp_path / f"r{time.perf_counter_ns()}")
    return read_tree(folder)


def put_format_1(store: ResultStore, key: str, manifest: dict, files: dict[str, bytes]) -> Path:
    """An entry as mechicl wrote it before issue 22 (job.json format 1, no checksums)."""
    folder = store.path(key)
    for rel, data in files.items():
        (folder / "result" / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / "result" / rel).write_bytes(data)
    (folder / "job.json").write_text(json.dumps({"format": 1, "key": key, **manifest},
                                                indent=2, sort_keys=True))
    return folder


# ---- the store: verification ---------------------------------------------------------------


def test_put_writes_checksums_and_verify_catches_every_kind_of_damage(tmp_path, caplog):
    store = ResultStore(tmp_path / "s")
    files = result_files(heads(), tmp_path)
    assert store.put(KEY, {"job": {"analysis": "scan"}}, files)
    folder = store.path(KEY)
    manifest = json.loads((folder / "job.json").read_text())
    assert manifest["format"] == FORMAT_VERSION == 2 and len(manifest["checksum"]) == 64
    assert sorted(manifest["result_sha256"]) == sorted(files)
    assert store.verify(KEY) and store.has(KEY)
    assert not store.verify("cd" * 32)
    pristine = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def restore() -> None:
        for p in folder.rglob("*"):
            if p.is_file() and p not in pristine:
                p.unlink()
        for p, data in pristine.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        assert store.verify(KEY)

    tensors = folder / "result" / "tensors.safetensors"
    job = folder / "job.json"
    damages = {
        "truncated": (lambda: tensors.write_bytes(pristine[tensors][:50]),
                      r"tensors.safetensors: checksum mismatch"),
        "flipped bit": (lambda: tensors.write_bytes(_flip(pristine[tensors], -5)),
                        r"tensors.safetensors: checksum mismatch"),
        "missing file": (tensors.unlink, r"tensors.safetensors is missing"),
        "extra file": (lambda: (folder / "result" / "x.txt").write_text("?"),
                       r"x.txt is not part of the stored result"),
        "garbage job.json": (lambda: job.write_text("{garbage"), r"job.json is not valid JSON"),
        "job.json a list": (lambda: job.write_text("[1]"), r"job.json holds a list"),
        "deleted job.json": (job.unlink, r"job.json is missing"),
        "format 99": (lambda: job.write_text(json.dumps({**manifest, "format": 99})),
                      r"job.json: format 99 is not one of \[1, 2\]"),
        "edited job.json": (lambda: job.write_text(json.dumps({**manifest, "seconds": 1.5})),
                            r"job.json: checksum mismatch"),
        "edited file hash": (lambda: job.write_text(json.dumps(
            {**manifest, "result_sha256": {**manifest["result_sha256"],
                                           "tensors.safetensors": "0" * 64}})),
            r"job.json: checksum mismatch"),
        "another key": (lambda: job.write_text(job.read_text().replace(KEY, "cd" * 32)),
                        r"names key 'cdcd"),
    }
    for name, (damage, message) in damages.items():
        damage()
        with pytest.raises(ResultError, match=message):
            store.verify(KEY)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert not store.has(KEY), name
        assert "not using it" in caplog.text and str(folder) in caplog.text, name
        table = store.table()  # `mechicl runs` lists it rather than crashing
        assert table.status.tolist() == [f"bad: {_one_error(store)}"], name
        with pytest.raises(ResultError):
            store.get(KEY).load()
        restore()
    assert store.table().status.tolist() == ["ok"]


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x40
    return bytes(out)


def _one_error(store: ResultStore) -> str:
    try:
        store.verify(KEY)
    except ResultError as err:
        return str(err)
    raise AssertionError("no error")


def test_a_flipped_exponent_bit_never_reaches_a_score(tmp_path):
    """Issue 22's case: one bit of a stored float64 turned a mean of 0.036 into 6.5e306."""
    store = ResultStore(tmp_path / "s")
    store.put(KEY, {"job": {}}, result_files(heads(0.036), tmp_path))
    tensors = store.path(KEY) / "result" / "tensors.safetensors"
    data = tensors.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    offsets = json.loads(data[8:header])["mean"]["data_offsets"]
    flipped = _flip(data, header + offsets[0] + 7)  # the high byte of the first float64
    values = torch.frombuffer(bytearray(flipped[header + offsets[0]:header + offsets[1]]),
                              dtype=torch.float64)
    assert values[0] > 1e300  # the damage the issue saw
    tensors.write_bytes(flipped)
    with pytest.raises(ResultError, match="tensors.safetensors: checksum mismatch"):
        store.get(KEY).load()
    with pytest.raises(ResultError, match="tensors.safetensors: checksum mismatch"):
        HeadScores.load(store.path(KEY) / "result")


def test_format_1_entries_verify_through_the_results_checksums_and_are_not_rewritten(tmp_path):
    store = ResultStore(tmp_path / "s")
    folder = put_format_1(store, KEY, {"job": {"analysis": "scan"}},
                          result_files(heads(), tmp_path))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
              if p.is_file()}
    assert store.verify(KEY) and store.has(KEY)
    assert not store.put(KEY, {"job": {}}, {"a": b"other"})  # intact: kept
    torch.testing.assert_close(store.get(KEY).load().mean, heads().mean)
    assert store.table().status.tolist() == ["ok"]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()} == before
    tensors = folder / "result" / "tensors.safetensors"
    tensors.write_bytes(before[tensors][0][:-10])
    with pytest.raises(ResultError, match="tensors.safetensors: checksum mismatch"):
        store.verify(KEY)
    assert store.put(KEY, {"job": {}}, result_files(heads(), tmp_path))  # bad: replaced
    assert json.loads((folder / "job.json").read_text())["format"] == 2 and store.verify(KEY)


def test_a_model_identity_file_that_is_damaged_is_not_trusted(tmp_path):
    store = ResultStore(tmp_path)
    identity = {"weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64, "info": {"x": 1}}
    store.remember_identity("f", identity)
    assert store.remembered_identity("f") == identity
    path = tmp_path / "models" / "f.json"
    path.write_text(path.read_text().replace("a" * 64, "a" * 63 + "e"))  # one changed digit
    assert store.remembered_identity("f") is None
    path.write_text(json.dumps(["not", "a", "dict"]))
    assert store.remembered_identity("f") is None
    path.write_text(json.dumps(identity))  # written before issue 22: no checksum, accepted
    assert store.remembered_identity("f") == identity


# ---- the runner: bad entries are computed again and reported ------------------------------


@pytest.fixture(scope="module")
def scan_grid(tiny_folder):
    return parse_grid({"grid": {"models": [str(tiny_folder)], "seeds": [0, 1]},
                       "analyses": {"scan": {"n_seeds": 2, "length": 8,
                                             "scores": ["prefix_matching", "copying"]}}})


def test_runner_recomputes_damaged_results_and_reports_them(scan_grid, tmp_path, caplog):
    store = ResultStore(tmp_path / "s")
    first = run_grid(scan_grid, store, progress=False)
    assert first.counts["computed"] == 2 and not first.invalid
    reference = store.contents()
    a, b = (row["key"] for row in first.asked_rows())
    damage = {
        # a truncated tensors file of a part (a scan's per-score sub-result)
        a: lambda p: (p / "result" / "prefix_matching" / "tensors.safetensors").write_bytes(
            b"\x00" * 20),
        # a deleted job.json used to abort the run ("Directory not empty" from os.rename)
        b: lambda p: (p / "job.json").unlink(),
    }
    for key, hurt in damage.items():
        hurt(store.path(key))
    with caplog.at_level(logging.WARNING):
        again = run_grid(scan_grid, store, progress=False)
    assert again.ok and again.counts == {"cached": 0, "computed": 2, "failed": 0}
    assert sorted(again.invalid) == sorted([a, b])
    assert "tensors.safetensors" in again.invalid[a] and "job.json is missing" in again.invalid[b]
    assert "not intact, computing it again" in caplog.text
    assert store.contents() == reference  # recomputed to the same bytes
    assert all(store.verify(k) for k in (a, b))

    (store.path(a) / "job.json").write_text("{garbage")
    third = run_grid(scan_grid, store, progress=False)
    assert third.counts == {"cached": 1, "computed": 1, "failed": 0}
    assert list(third.invalid) == [a] and store.contents() == reference
    assert run_grid(scan_grid, store, progress=False).counts["cached"] == 2


def test_a_seed_folder_with_a_corrupt_part_is_not_reused(scan_grid, tmp_path):
    """``--reuse`` folders: the whole result, parts included, is verified before it is copied
    in (reading only the top folder let a corrupt part into the store)."""
    donor = ResultStore(tmp_path / "donor")
    summary = run_grid(scan_grid, donor, progress=False)
    out = tmp_path / "out"
    entries = {}
    for i, row in enumerate(summary.asked_rows()):
        shutil.copytree(donor.path(row["key"]) / "result", out / "results" / f"scan{i}")
        entries[f"scan{i}"] = {"key": row["key"], "job": None, "seconds": 1.0}
    write_index(out / "results", entries)
    jobs = scan_grid.jobs()
    entry = {m: scan_grid.entry(m) for m in scan_grid.models}
    reused = run_jobs(jobs, tmp_path / "s1", entries=entry, progress=False, seed_from=[out])
    assert reused.counts == {"cached": 2, "computed": 0, "failed": 0} and not reused.invalid

    part = out / "results" / "scan0" / "copying" / "tensors.safetensors"
    part.write_bytes(_flip(part.read_bytes(), -3))
    read_result(out / "results" / "scan0")  # the top folder alone still reads...
    with pytest.raises(ResultError, match="copying/tensors.safetensors: checksum mismatch"):
        verify_result(out / "results" / "scan0")  # ...its part does not
    store = ResultStore(tmp_path / "s2")
    fresh = run_jobs(jobs, store, entries=entry, progress=False, seed_from=[out])
    assert fresh.counts == {"cached": 1, "computed": 1, "failed": 0}
    assert list(fresh.invalid) == [entries["scan0"]["key"]]
    assert store.contents() == donor.contents()


def test_an_export_seeds_another_store_and_is_never_half_written(scan_grid, tmp_path, capsys):
    """``ResultStore.export`` / ``mechicl runs --export``: how a long computation's finished
    results travel to another session's store (``--reuse``)."""
    from mechicl.cli import main

    donor = ResultStore(tmp_path / "donor")
    summary = run_grid(scan_grid, donor, progress=False)
    a, b = (row["key"] for row in summary.asked_rows())
    out = tmp_path / "carried"
    assert main(["runs", "--store", str(donor.root), "--export", str(out)]) == 0
    assert "exported 2 results" in capsys.readouterr().out
    index = read_index(out / "results")
    assert sorted(index) == sorted(f"scan/{k}" for k in (a, b))
    assert {e["key"] for e in index.values()} == {a, b}
    assert all(e["job"]["analysis"] == "scan" for e in index.values())

    jobs = scan_grid.jobs()
    entry = {m: scan_grid.entry(m) for m in scan_grid.models}
    store = ResultStore(tmp_path / "fresh")
    reused = run_jobs(jobs, store, entries=entry, progress=False, seed_from=[out])
    assert reused.counts == {"cached": 2, "computed": 0, "failed": 0} and not reused.invalid
    assert store.contents() == donor.contents()
    assert store.get(a).manifest["executor"] == "imported"

    # one key only; a damaged result is an error and the earlier export stays as it was
    assert list(donor.export(out, [b])) == [f"scan/{b}"]
    before = read_tree(out)
    part = donor.path(a) / "result" / "copying" / "tensors.safetensors"
    part.write_bytes(_flip(part.read_bytes(), -3))
    with pytest.raises(ResultError, match="copying/tensors.safetensors: checksum mismatch"):
        donor.export(out)
    assert read_tree(out) == before
    with pytest.raises(SystemExit, match=r"1 listed results are damaged \(first: "
                                         f"{a[:12]}"):
        main(["runs", "--store", str(donor.root), "--export", str(out)])
    assert read_tree(out) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--export .*file is a file; give a folder"):
        main(["runs", "--store", str(donor.root), "--analysis", "scan", "--export",
              str(tmp_path / "file")])
    with pytest.raises(KeyError, match="no result"):
        donor.export(out, ["cd" * 32])


# ---- overwriting never loses the old result -------------------------------------------------


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "data.txt").write_text(text)
    (path / "more.txt").write_text(text * 2)
    return path


def _read(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _failing_second_call(monkeypatch, name: str) -> None:
    real = getattr(os, name)
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated failure of the second rename")
        return real(src, dst)

    monkeypatch.setattr(os, name, replace)


def _no_exchange(monkeypatch) -> None:
    monkeypatch.setattr(io, "exchange", lambda a, b: False)


def test_exchange_swaps_folders_here():
    """The machine the tests run on swaps folders in one step (Linux renameat2): the atomic
    path is the one exercised by the kill tests below."""
    assert sys.platform != "linux" or io._RENAMEAT2 is not None


@pytest.mark.parametrize("mode", ["exchange fails", "second rename fails"])
def test_atomic_path_keeps_the_old_folder_whatever_fails(tmp_path, monkeypatch, mode):
    target = _folder(tmp_path / "result", "old")
    if mode == "exchange fails":
        def broken(a, b):
            raise OSError("simulated failure of the exchange")
        monkeypatch.setattr(io, "exchange", broken)
    else:
        _no_exchange(monkeypatch)
        _failing_second_call(monkeypatch, "replace")
    with pytest.raises(OSError, match="simulated"), io.atomic_path(target) as tmp:
        _folder(tmp, "new")
    monkeypatch.undo()
    assert _read(target) == {"data.txt": "old", "more.txt": "oldold"}
    assert [p.name for p in tmp_path.iterdir()] == ["result"]  # no leftovers
    with io.atomic_path(target) as tmp:  # and the next overwrite works
        _folder(tmp, "new")
    assert _read(target) == {"data.txt": "new", "more.txt": "newnew"}


@pytest.mark.parametrize("mode", ["exchange fails", "second rename fails"])
def test_put_replace_keeps_the_old_result_whatever_fails(tmp_path, monkeypatch, mode):
    store = ResultStore(tmp_path)
    old = result_files(heads(1.0), tmp_path)
    store.put(KEY, {"job": {}}, old)
    if mode == "exchange fails":
        def broken(a, b):
            raise OSError("simulated failure of the exchange")
        monkeypatch.setattr(io, "exchange", broken)
    else:
        _no_exchange(monkeypatch)
        _failing_second_call(monkeypatch, "replace")
    with pytest.raises(OSError, match="simulated"):
        store.put(KEY, {"job": {}}, result_files(heads(2.0), tmp_path), replace=True)
    monkeypatch.undo()
    assert store.verify(KEY) and store.get(KEY).files() == old
    assert not any((tmp_path / "tmp").iterdir())
    new = result_files(heads(2.0), tmp_path)
    assert store.put(KEY, {"job": {}}, new, replace=True) and store.get(KEY).files() == new


def test_put_replaces_a_damaged_folder_and_keeps_it_if_that_fails(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    files = result_files(heads(), tmp_path)
    store.put(KEY, {"job": {}}, files)
    (store.path(KEY) / "job.json").unlink()  # used to abort: "Directory not empty"
    _failing_second_call(monkeypatch, "replace")
    def broken(a, b):
        raise OSError("simulated failure of the exchange")

    monkeypatch.setattr(io, "exchange", broken)
    with pytest.raises(OSError, match="simulated"):
        store.put(KEY, {"job": {}}, files)
    monkeypatch.undo()
    assert (store.path(KEY) / "result").is_dir() and not store.has(KEY)
    assert store.put(KEY, {"job": {}}, files) and store.verify(KEY)


# ---- SIGKILL mid-commit -----------------------------------------------------------------------

_LOAD_IO = textwrap.dedent(f"""
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("mio", {str(ROOT / "mechicl" / "_io.py")!r})
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
""")  # _io alone (no torch import): a fast subprocess


def _overwrite_loop(target: Path, progress: Path) -> subprocess.Popen:
    code = _LOAD_IO + textwrap.dedent(f"""
        from pathlib import Path
        target, progress = Path({str(target)!r}), Path({str(progress)!r})
        i = 0
        while True:
            i += 1
            with io.atomic_path(target) as tmp:
                tmp.mkdir()
                for n in range(20):
                    (tmp / f"f{{n}}").write_text(str(i) * 1000)
            (progress.parent / "progress.tmp").write_text(str(i))
            os.replace(progress.parent / "progress.tmp", progress)
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def test_sigkill_during_overwrites_leaves_a_complete_folder(tmp_path):
    """A process overwriting a folder in a loop, killed (SIGKILL) at 8 random moments: the
    folder is always complete (20 files of one version) and the next overwrite succeeds."""
    import random

    rng = random.Random(0)
    target, progress = tmp_path / "out" / "result", tmp_path / "progress"
    for _ in range(8):
        progress.unlink(missing_ok=True)
        proc = _overwrite_loop(target, progress)
        deadline = time.time() + 60
        while not progress.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert progress.exists(), "the loop never committed"
        files = {p.name: p.read_text() for p in target.iterdir()}
        assert len(files) == 20 and len(set(files.values())) == 1
        done = int(progress.read_text())  # the last version committed, or the next one
        assert files["f0"] in (str(done) * 1000, str(done + 1) * 1000)
    with io.atomic_path(target) as tmp:
        _folder(tmp, "final")
    assert _read(target) == {"data.txt": "final", "more.txt": "finalfinal"}
    assert [p.name for p in target.parent.iterdir()] == ["result"]  # leftovers cleaned


_KILL_ON_SECOND_RENAME = textwrap.dedent("""
    io.exchange = lambda a, b: False  # no one-step exchange: the fallback's two renames
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # killed between the two renames
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
""")


def test_sigkill_between_the_two_renames_then_the_old_folder_is_put_back(tmp_path):
    """Without the one-step exchange (another OS or file system), a process killed between
    the two renames leaves the old folder aside; the next write to the same target puts it
    back before anything else, so it is never lost."""
    target = _folder(tmp_path / "result", "old")
    code = _LOAD_IO + _KILL_ON_SECOND_RENAME + textwrap.dedent(f"""
        with io.atomic_path({str(target)!r}) as tmp:
            tmp.mkdir()
            (tmp / "data.txt").write_text("new")
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()  # killed between the renames: the old folder is aside
    with pytest.raises(RuntimeError, match="the writer fails"), io.atomic_path(target):
        raise RuntimeError("the writer fails")  # nothing new is written...
    assert _read(target) == {"data.txt": "old", "more.txt": "oldold"}  # ...the old one is back
    assert [p.name for p in tmp_path.iterdir()] == ["result"]


def test_sigkill_mid_put_replace_leaves_an_intact_result(tmp_path):
    """``put(replace=True)`` in a loop in a subprocess (two alternating results), killed with
    SIGKILL: the store holds one of the two, intact; a killed fallback commit (between the
    two renames) is put back by the next run's ``clean_tmp``."""
    store = ResultStore(tmp_path / "s")
    a, b = result_files(heads(1.0), tmp_path), result_files(heads(2.0), tmp_path)
    store.put(KEY, {"job": {}}, a)
    (tmp_path / "a.json").write_text(json.dumps({k: v.hex() for k, v in a.items()}))
    (tmp_path / "b.json").write_text(json.dumps({k: v.hex() for k, v in b.items()}))
    loop = textwrap.dedent(f"""
        import json, os, signal, sys
        from pathlib import Path
        import mechicl._io as io
        from mechicl.experiments.store import ResultStore
        tmp = Path({str(tmp_path)!r})
        versions = [{{k: bytes.fromhex(v) for k, v in json.loads((tmp / n).read_text()).items()}}
                    for n in ("a.json", "b.json")]
        store = ResultStore(tmp / "s")
        if sys.argv[1] == "between":
            {textwrap.indent(_KILL_ON_SECOND_RENAME, " " * 12).strip()}
        i = 0
        while True:
            i += 1
            store.put({KEY!r}, {{"job": {{}}}}, versions[i % 2], replace=True)
            (tmp / "progress").write_text(str(i))
    """)
    proc = subprocess.Popen([sys.executable, "-c", loop, "loop"])
    deadline = time.time() + 300
    while not (tmp_path / "progress").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "progress").exists(), "the loop never committed"
    assert store.verify(KEY) and store.get(KEY).files() in (a, b)

    proc = subprocess.run([sys.executable, "-c", loop, "between"], timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not store.path(KEY).exists()  # killed between the two renames
    store.clean_tmp()  # what the next run does first
    assert store.verify(KEY) and store.get(KEY).files() in (a, b)
    assert not any((store.root / "tmp").iterdir())


# ---- result files ------------------------------------------------------------------------------


def test_pages_of_a_result_are_checksummed(tmp_path):
    """A report's pages and figure JSON (written by ``extra``) were not checksummed: a flipped
    digit in ``img/*.json`` changed a figure silently."""
    def pages(folder: Path) -> None:
        (folder / "img").mkdir()
        (folder / "img" / "fig.json").write_text('{"y": [0.036]}')
        (folder / "report.md").write_text("# report")

    path = write_result(tmp_path / "r", kind="HeadScores", params={}, model=MODEL,
                        tensors={"x": torch.ones(2)}, parts={"sub": heads()}, extra=pages)
    meta = json.loads((path / "result.json").read_text())
    assert sorted(meta["pages"]) == ["img/fig.json", "report.md"]  # parts are not pages
    verify_result(path)
    (path / "img" / "fig.json").write_text('{"y": [6.5e306]}')
    with pytest.raises(ResultError, match=r"img/fig.json: checksum mismatch"):
        read_result(path)
    (path / "img" / "fig.json").unlink()
    with pytest.raises(ResultError, match=r"img/fig.json is missing"):
        verify_result(path)
    plain = heads().save(tmp_path / "plain")  # results without pages: bytes as before
    assert "pages" not in json.loads((plain / "result.json").read_text())


def test_an_unreadable_data_file_is_a_result_error_not_a_safetensors_error(tmp_path):
    """Even a file whose recorded checksum matches (e.g. written truncated by a foreign tool)
    raises ResultError naming it, never SafetensorError."""
    path = heads().save(tmp_path / "r")
    tensors = path / "tensors.safetensors"
    save_file({"mean": torch.ones(2)}, str(tensors))
    tensors.write_bytes(tensors.read_bytes()[:-4])
    meta = json.loads((path / "result.json").read_text())
    meta["files"]["tensors.safetensors"] = hashlib.sha256(tensors.read_bytes()).hexdigest()
    canonical = json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True,
                           separators=(",", ":"))  # as write_result computes the checksum
    meta["checksum"] = hashlib.sha256(canonical.encode()).hexdigest()
    (path / "result.json").write_text(json.dumps(meta))
    with pytest.raises(ResultError, match=r"tensors.safetensors cannot be read \(Safetensor"):
        load_result(path)


def test_results_index_checks_its_format(tmp_path):
    write_index(tmp_path, {"a": {"key": KEY, "job": None, "seconds": 1.0}})
    data = json.loads((tmp_path / "index.json").read_text())
    assert data["format"] == 1 and read_index(tmp_path)["a"]["key"] == KEY
    del data["format"]  # indexes written before issue 22
    (tmp_path / "index.json").write_text(json.dumps(data))
    assert read_index(tmp_path)["a"]["key"] == KEY
    data["format"] = 99
    (tmp_path / "index.json").write_text(json.dumps(data))
    with pytest.raises(ResultError, match=r"index.json: format 99 is not 1"):
        read_index(tmp_path)


def test_scan_parts_are_verified_on_load_through_the_store(tmp_path):
    scan = ScanResult(scores={"prefix_matching": heads()}, loss_first_copy=torch.rand(3),
                      loss_later_copies=torch.rand(3), params={"scores": ["prefix_matching"]},
                      model=MODEL)
    store = ResultStore(tmp_path / "s")
    store.put(KEY, {"job": {}}, result_files(scan, tmp_path))
    part = store.path(KEY) / "result" / "prefix_matching" / "result.json"
    part.write_text(part.read_text().replace('"s"', '"t"'))
    with pytest.raises(ResultError, match=r"prefix_matching/result.json: checksum mismatch"):
        store.get(KEY).load()
