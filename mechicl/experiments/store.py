"""A content-addressed result store: one folder per finished job, named by the job's key.

Layout::

    STORE/
      objects/ab/abcdef.../job.json      the job, its key, the model's provenance, timings
      objects/ab/abcdef.../result/...    the result as the analysis saves it (safetensors,
                                         JSON, parquet; never pickle)
      models/<fingerprint>.json          model identities by file fingerprint (to skip loading
                                         a model whose jobs are all finished)
      tmp/                               folders being written

A result is written into ``tmp/`` and renamed onto ``objects/..`` in one ``os.rename``: a run
killed at any moment (``kill -9``) leaves either a complete result or none, and the next run
computes exactly the missing ones. Two runs finishing the same job keep the first result (the
rename of the second fails and its copy is dropped): keys are content addresses, so both are
the same result.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechicl._io import atomic_write_text
from mechicl.model.loading import cache_dir
from mechicl.results import ResultError, load_result

__all__ = ["INDEX_FILE", "ResultStore", "StoredResult", "as_store", "default_store", "index_text",
           "read_index", "read_tree", "write_index", "write_tree"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

INDEX_FILE = "index.json"
"""The file of an output folder's ``results/`` naming each result's job and key, so that the
folder can seed a store (``run_jobs(seed_from=...)``)."""


def default_store() -> Path:
    """``$MECHICL_STORE`` if set, else ``$MECHICL_CACHE/runs`` (or the user cache dir's
    ``runs``)."""
    env = os.environ.get("MECHICL_STORE")
    return Path(env).expanduser() if env else cache_dir() / "runs"


@dataclass(frozen=True)
class StoredResult:
    """A finished job in the store: its key, folder and manifest (``job.json``)."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def result_path(self) -> Path:
        """The result's folder (a result folder of :mod:`mechicl.results`)."""
        return self.path / "result"

    def load(self) -> Any:
        """The result, loaded and verified (:func:`mechicl.load_result`)."""
        return load_result(self.result_path)

    def files(self) -> dict[str, bytes]:
        """The result's files (relative path -> bytes), without the manifest: what two runs
        of the same job are compared by (the manifest holds times and hosts)."""
        return read_tree(self.result_path)


def read_tree(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``root``: relative path -> bytes (how results travel to and from
    workers)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_tree(root: str | os.PathLike[str], files: Mapping[str, bytes]) -> None:
    """Write :func:`read_tree`'s output under ``root``; a path that leaves ``root`` is an
    error."""
    root = Path(root)
    for rel, data in files.items():
        dest = (root / rel).resolve()
        if not dest.is_relative_to(root.resolve()):
            raise ValueError(f"result file {rel!r} escapes its folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk before the commit rename, so a
    committed result survives a power cut, not only a killed process."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultStore:
    """A folder of finished job results addressed by key (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The folder of the result ``key`` (a bad key raises)."""
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"{key!r} is not a job key (64 lowercase hex digits)")
        return self.root / "objects" / key[:2] / key

    def has(self, key: str) -> bool:
        """A finished result ``key`` is stored."""
        return (self.path(key) / "job.json").is_file()

    def get(self, key: str) -> StoredResult:
        """The stored result ``key`` (``KeyError`` if there is none)."""
        path = self.path(key)
        try:
            manifest = json.loads((path / "job.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyError(f"no result {key} in {self.root}") from None
        return StoredResult(key=key, path=path, manifest=manifest)

    def _tmp_dir(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        folder = tmp / name
        folder.mkdir()
        return folder

    def put(self, key: str, manifest: dict[str, Any], files: dict[str, bytes], *,
            replace: bool = False) -> bool:
        """Commit a result: ``files`` (paths relative to the result folder -> bytes) and the
        manifest, atomically. Returns False if the key was already there (nothing changed),
        unless ``replace``: then the old result is moved aside only once the new one is
        complete, and removed after the new one is in place."""
        target = self.path(key)
        if self.has(key) and not replace:
            return False
        work = self._tmp_dir()
        try:
            folder = work / key
            write_tree(folder / "result", files)
            (folder / "result").mkdir(parents=True, exist_ok=True)
            body = {"format": FORMAT_VERSION, "key": key, **manifest}
            (folder / "job.json").write_text(json.dumps(body, indent=2, sort_keys=True),
                                             encoding="utf-8")
            _fsync_tree(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            if replace and target.exists():
                os.rename(target, work / "old")
            try:
                os.rename(folder, target)
            except OSError:
                if self.has(key):  # another run committed it first: same content address
                    return False
                raise
            return True
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def put_folder(self, key: str, manifest: dict[str, Any], folder: str | os.PathLike[str]
                   ) -> bool:
        """Commit the result folder ``folder`` (e.g. one written by the command line or a
        report) under ``key``, as :meth:`put`."""
        return self.put(key, manifest, read_tree(folder))

    def discard(self, key: str) -> bool:
        """Remove the result ``key`` (to compute it again); False if it was not there. The
        folder is renamed away first, so a reader never sees half of it."""
        target = self.path(key)
        if not target.is_dir():
            return False
        gone = self._tmp_dir() / key
        os.rename(target, gone)
        shutil.rmtree(gone.parent, ignore_errors=True)
        return True

    def keys(self) -> Iterator[str]:
        """The keys of every finished result."""
        objects = self.root / "objects"
        if not objects.is_dir():
            return
        for prefix in sorted(objects.iterdir()):
            for folder in sorted(prefix.iterdir()):
                if (folder / "job.json").is_file():
                    yield folder.name

    def entries(self) -> Iterator[StoredResult]:
        """Every finished result."""
        for key in self.keys():
            yield self.get(key)

    def contents(self) -> dict[str, dict[str, bytes]]:
        """key -> :meth:`StoredResult.files` of every stored result (for comparing stores)."""
        return {entry.key: entry.files() for entry in self.entries()}

    def table(self) -> pd.DataFrame:
        """One row per stored result: key, analysis, model (name, weights hash), task, shots,
        seed, options, mechicl version, when, how long, where."""
        rows = []
        for entry in self.entries():
            m = entry.manifest
            job = m.get("job", {})
            model = m.get("model", {})
            options = job.get("options", {})
            rows.append({
                "key": entry.key[:12], "analysis": job.get("analysis"),
                "model": job.get("model"), "weights": str(model.get("weights_sha256", ""))[:12],
                "task": job.get("task"), "shots": job.get("shots"), "seed": job.get("seed"),
                "options": json.dumps(options, sort_keys=True),
                "mechicl": m.get("mechicl"), "created": m.get("created"),
                "seconds": m.get("seconds"), "host": m.get("host"),
                "executor": m.get("executor"),
            })
        columns = ["key", "analysis", "model", "weights", "task", "shots", "seed", "options",
                   "mechicl", "created", "seconds", "host", "executor"]
        return pd.DataFrame(rows, columns=columns)

    def clean_tmp(self) -> int:
        """Remove unfinished folders left by runs of this host that are no longer alive
        (e.g. killed); returns how many. Folders of live runs are kept."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return 0
        host = socket.gethostname()
        removed = 0
        for folder in tmp.iterdir():
            parts = folder.name.rsplit(".", 2)
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            if int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if removed:
            log.info("removed %d unfinished result folders of killed runs", removed)
        return removed

    # ---- model identities ---------------------------------------------------------------

    def remembered_identity(self, fingerprint: str) -> dict[str, Any] | None:
        """The model identity remembered for a file fingerprint, if any."""
        path = self.root / "models" / f"{fingerprint}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def remember_identity(self, fingerprint: str, identity: dict[str, Any]) -> None:
        """Remember a model's identity for its file fingerprint (atomically)."""
        atomic_write_text(self.root / "models" / f"{fingerprint}.json",
                          json.dumps(identity, indent=2, sort_keys=True))


def as_store(store: ResultStore | str | os.PathLike[str] | None) -> ResultStore:
    """``store``, its folder, or None (:func:`~mechicl.experiments.store.default_store`) as
    a :class:`~mechicl.experiments.store.ResultStore`."""
    return store if isinstance(store, ResultStore) else ResultStore(store or default_store())


# ---- indexes of output folders -------------------------------------------------------------


def _index_checksum(entries: Mapping[str, Any]) -> str:
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def index_text(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """The content of an ``index.json``: ``{"results": {name: {"key", "job", "seconds"}},
    "checksum"}``."""
    body = {name: dict(entry) for name, entry in entries.items()}
    return json.dumps({"results": body, "checksum": _index_checksum(body)}, indent=2,
                      sort_keys=True, default=str)


def write_index(folder: str | os.PathLike[str], entries: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``folder/index.json`` (see :func:`index_text`), atomically."""
    return atomic_write_text(Path(folder) / INDEX_FILE, index_text(entries))


def read_index(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``folder/index.json``'s entries (empty if there is none).

    Raises:
        ResultError: the file is not valid JSON or its checksum does not match.
    """
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["results"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ResultError(f"{path} is not a results index ({err})") from None
    if data.get("checksum") != _index_checksum(entries):
        raise ResultError(f"{path}: checksum mismatch (edited or corrupt)")
    return entries
