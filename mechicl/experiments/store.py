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
the same result. Replacing a result (``put(replace=True)``, or a corrupt entry) swaps the two
folders in one step (:func:`mechicl._io.replace_folder`): the old result stays until the new
one is in place.

**Verification.** ``job.json`` (format 2) holds the sha256 of every file of ``result/``
(``result_sha256``) and a ``checksum`` of its own content. :meth:`ResultStore.verify` checks
both (hashing the files costs about a second per GB); entries of format 1 (written by mechicl
before issue 22, without these fields) are verified through the result folder's own checksums
(:func:`mechicl.results.verify_result`: ``result.json``, its data files and parts; a report's
pages are then not covered) and stay readable as they are, without being rewritten. A folder
that fails (a truncated or edited file, a missing or garbage ``job.json``, an unknown format)
is not a stored result: :meth:`ResultStore.has` is False, the runner computes the job again and
the new result replaces the bad folder.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechicl._io import atomic_path, atomic_write_text, pid_alive, replace_folder
from mechicl.model.loading import cache_dir
from mechicl.results import ResultError, load_result, verify_result

__all__ = ["FORMAT_VERSION", "INDEX_FILE", "INDEX_FORMAT", "JOB_FILE", "READ_FORMATS", "ResultStore",
           "StoredResult", "as_store", "default_store", "index_text", "read_index",
           "read_manifest", "read_tree", "write_index", "write_tree"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""The ``job.json`` format this mechicl writes: 2 adds ``result_sha256`` and ``checksum``."""
READ_FORMATS = (1, 2)
"""The ``job.json`` formats this mechicl reads (1: verified through the result's own
checksums)."""
JOB_FILE = "job.json"

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

    def verify(self) -> None:
        """Check the result's files against the manifest (format 2) or the result folder's
        own checksums (format 1).

        Raises:
            ResultError: a file is missing, extra, truncated or edited (named in the message).
        """
        digests = self.manifest.get("result_sha256")
        if digests is None:
            verify_result(self.result_path)
        else:
            _check_digests(self.result_path, digests, read_tree(self.result_path))

    def load(self) -> Any:
        """The result, loaded and verified (:meth:`verify`, :func:`mechicl.load_result`)."""
        self.verify()
        return load_result(self.result_path)

    def files(self) -> dict[str, bytes]:
        """The result's files (relative path -> bytes), verified, without the manifest: what
        two runs of the same job are compared by (the manifest holds times and hosts)."""
        files = read_tree(self.result_path)
        digests = self.manifest.get("result_sha256")
        if digests is None:
            verify_result(self.result_path)
        else:
            _check_digests(self.result_path, digests, files)
        return files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(manifest: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in manifest.items() if k != "checksum"}, sort_keys=True,
                      separators=(",", ":"), default=str)


def _check_digests(root: Path, digests: Mapping[str, str], files: Mapping[str, bytes]) -> None:
    """``files`` (read from ``root``) are exactly the files of ``digests``, byte for byte."""
    for rel in sorted(set(digests) - set(files)):
        raise ResultError(f"{root / rel} is missing; the stored result is incomplete")
    for rel in sorted(set(files) - set(digests)):
        raise ResultError(f"{root / rel} is not part of the stored result (an extra file)")
    for rel, data in files.items():
        if _sha256(data) != digests[rel]:
            raise ResultError(f"{root / rel}: checksum mismatch (truncated, corrupt or edited)")


def read_manifest(path: str | os.PathLike[str], key: str | None = None) -> dict[str, Any]:
    """A stored job's ``job.json``, checked: it parses, is of a format this mechicl reads, names
    ``key`` (if given) and (format 2) matches its checksum. The result's files are not read.

    Raises:
        ResultError: missing, garbage, edited or of an unknown format (the message names the
            file).
    """
    file = Path(path) / JOB_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{file} is missing; the stored result is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultError(f"{file} is not valid JSON ({err}); the stored result is corrupt"
                          ) from None
    if not isinstance(manifest, dict):
        raise ResultError(f"{file} holds a {type(manifest).__name__}, not a job manifest")
    found = manifest.get("format")
    if type(found) is not int or found not in READ_FORMATS:
        raise ResultError(f"{file}: format {found!r} is not one of {list(READ_FORMATS)}, the "
                          "store formats this mechicl reads")
    if key is not None and manifest.get("key") != key:
        raise ResultError(f"{file} names key {manifest.get('key')!r}, not its folder's {key}")
    if found >= 2:
        if manifest.get("checksum") != _sha256(_canonical(manifest).encode()):
            raise ResultError(f"{file}: checksum mismatch (the file was edited or is corrupt)")
        digests = manifest.get("result_sha256")
        if not isinstance(digests, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
            raise ResultError(f"{file}: result_sha256 is not a map of file -> sha256")
    return manifest


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

    def verify(self, key: str) -> bool:
        """Check the stored result ``key``: its manifest and every file (see the module
        docstring). True if it is stored and intact, False if nothing is stored under
        ``key``.

        Raises:
            ResultError: something is stored under ``key`` but is not an intact result: a
                missing or garbage ``job.json``, an unknown format, a missing, extra, truncated
                or edited file (the message names the file).
        """
        path = self.path(key)
        if not path.exists():
            return False
        StoredResult(key=key, path=path, manifest=read_manifest(path, key)).verify()
        return True

    def has(self, key: str) -> bool:
        """An intact result ``key`` is stored (:meth:`verify`; a bad one is logged as a
        warning and counts as missing)."""
        try:
            return self.verify(key)
        except ResultError as err:
            log.warning("%s: not using it", err)
            return False

    def get(self, key: str) -> StoredResult:
        """The stored result ``key``, its manifest checked (:func:`read_manifest`); its files
        are verified when read (:meth:`StoredResult.load`, :meth:`StoredResult.files`).

        Raises:
            KeyError: nothing is stored under ``key``.
            ResultError: the manifest is missing, garbage, edited or of an unknown format.
        """
        path = self.path(key)
        if not path.exists():
            raise KeyError(f"no result {key} in {self.root}")
        return StoredResult(key=key, path=path, manifest=read_manifest(path, key))

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
        manifest, atomically. Returns False if an intact result ``key`` was already there
        (nothing changed), unless ``replace``. A folder under ``key`` that is not an intact
        result (:meth:`verify`), or any result with ``replace``, is replaced: the two folders
        are swapped in one step once the new one is complete (:func:`mechicl._io.replace_folder`),
        so the old result stays in place if anything fails."""
        target = self.path(key)
        if not replace and self._intact(key):
            return False
        work = self._tmp_dir()
        try:
            folder = work / key
            write_tree(folder / "result", files)
            (folder / "result").mkdir(parents=True, exist_ok=True)
            body = {**manifest, "format": FORMAT_VERSION, "key": key,
                    "result_sha256": {rel: _sha256(data) for rel, data in sorted(files.items())}}
            body = json.loads(json.dumps(body))  # the checksum of what a reader will see
            body["checksum"] = _sha256(_canonical(body).encode())
            (folder / JOB_FILE).write_text(json.dumps(body, indent=2, sort_keys=True),
                                           encoding="utf-8")
            _fsync_tree(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if not replace and self._intact(key):  # another run committed it meanwhile
                    return False
                replace_folder(folder, target)  # the old folder ends in work/, removed below
                return True
            try:
                os.rename(folder, target)
            except OSError:
                if self._intact(key):  # another run committed it first: same content address
                    return False
                raise
            return True
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _intact(self, key: str) -> bool:
        try:
            return self.verify(key)
        except ResultError:
            return False

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

    def _folders(self) -> Iterator[Path]:
        objects = self.root / "objects"
        if not objects.is_dir():
            return
        for prefix in sorted(objects.iterdir()):
            if prefix.is_dir():
                yield from sorted(p for p in prefix.iterdir() if p.is_dir())

    def keys(self) -> Iterator[str]:
        """The keys of every finished result (a folder with a ``job.json``; not verified:
        see :meth:`verify`)."""
        for folder in self._folders():
            if (folder / JOB_FILE).is_file():
                yield folder.name

    def entries(self) -> Iterator[StoredResult]:
        """Every finished result whose manifest reads (:meth:`get`); bad ones are logged as
        warnings and left out."""
        for key in self.keys():
            try:
                yield self.get(key)
            except ResultError as err:
                log.warning("%s", err)

    def contents(self) -> dict[str, dict[str, bytes]]:
        """key -> :meth:`StoredResult.files` of every stored result (for comparing stores;
        a corrupt result raises :class:`~mechicl.results.ResultError`)."""
        return {entry.key: entry.files() for entry in self.entries()}

    def export(self, folder: str | os.PathLike[str], keys: Iterable[str] | None = None
               ) -> dict[str, dict[str, Any]]:
        """Copy finished results into ``folder/results/`` with its ``index.json``: a folder
        that seeds another store (``mechicl report --reuse FOLDER``, ``run_jobs(seed_from=)``),
        e.g. to carry a long computation's finished part to another machine or session.

        Each result goes to ``results/<analysis>/<key>/``. Every result is verified first; a
        damaged one is an error, and nothing is written. ``folder/results/`` is replaced as a
        whole, in one step (:func:`mechicl._io.atomic_path`); other files in ``folder`` are
        left alone.

        Args:
            folder: the folder to write (created).
            keys: the results to copy (default: every finished result).

        Returns:
            The index's entries: name under ``results/`` -> key, job, seconds, mechicl version.

        Raises:
            KeyError: a key is not stored.
            ResultError: a result is damaged (the message names the file).
        """
        chosen = sorted(self.keys()) if keys is None else list(dict.fromkeys(keys))
        stored = [self.get(key) for key in chosen]
        files = {s.key: s.files() for s in stored}  # verified, before anything is written
        entries: dict[str, dict[str, Any]] = {}
        with atomic_path(Path(folder) / "results") as tmp:
            tmp.mkdir()
            for s in stored:
                name = f"{s.manifest['job']['analysis']}/{s.key}"
                write_tree(tmp / name, files[s.key])
                entries[name] = {"key": s.key, "job": s.manifest["job"],
                                 "seconds": s.manifest.get("seconds"),
                                 "mechicl": s.manifest.get("mechicl")}
            write_index(tmp, entries)
        return entries

    def table(self, *, verify: bool = True) -> pd.DataFrame:
        """One row per folder of the store: key, analysis, model (name, weights hash), task,
        shots, seed, options, mechicl version, when, how long, where, and ``status``: ``ok``,
        or why the folder is not an intact result (computed again when a run needs it).

        Args:
            verify: hash every result's files (:meth:`verify`); False checks only the
                manifests (``job.json``).
        """
        rows = []
        for folder in self._folders():
            key = folder.name
            try:
                m = read_manifest(folder, key)
                if verify:
                    StoredResult(key=key, path=folder, manifest=m).verify()
                status = "ok"
            except ResultError as err:
                m, status = {}, f"bad: {err}"
                with contextlib.suppress(OSError, ValueError):  # what it still tells
                    raw = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
                    m = raw if isinstance(raw, dict) else {}
            job = m.get("job") if isinstance(m.get("job"), dict) else {}
            model = m.get("model") if isinstance(m.get("model"), dict) else {}
            options = job.get("options", {})
            rows.append({
                "key": key[:12], "analysis": job.get("analysis"),
                "model": job.get("model"), "weights": str(model.get("weights_sha256", ""))[:12],
                "task": job.get("task"), "shots": job.get("shots"), "seed": job.get("seed"),
                "options": json.dumps(options, sort_keys=True, default=str),
                "mechicl": m.get("mechicl"), "created": m.get("created"),
                "seconds": m.get("seconds"), "host": m.get("host"),
                "executor": m.get("executor"), "status": status,
            })
        columns = ["key", "analysis", "model", "weights", "task", "shots", "seed", "options",
                   "mechicl", "created", "seconds", "host", "executor", "status"]
        return pd.DataFrame(rows, columns=columns)

    def clean_tmp(self) -> int:
        """Remove unfinished folders left by runs of this host that are no longer alive
        (e.g. killed); returns how many. Folders of live runs are kept. An old result that a
        killed run had moved aside to replace it is put back first."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return 0
        host = socket.gethostname()
        removed = 0
        for folder in tmp.iterdir():
            parts = folder.name.rsplit(".", 2)
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            if int(parts[1]) != os.getpid() and not pid_alive(int(parts[1])):
                self._restore_aside(folder)
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if removed:
            log.info("removed %d unfinished result folders of killed runs", removed)
        return removed

    def _restore_aside(self, work: Path) -> None:
        """Put back an old result that a run killed between the two renames of a replacing
        commit left aside in its ``tmp/`` folder (only without the one-step exchange of
        :func:`mechicl._io.replace_folder`), if nothing took its place."""
        for aside in work.glob("*.old"):
            key = aside.name.removesuffix(".old")
            try:
                target = self.path(key)
            except ValueError:
                continue
            if aside.is_dir() and not target.exists():
                os.replace(aside, target)
                log.warning("restored %s, left aside by a killed run", target)

    # ---- model identities ---------------------------------------------------------------

    def remembered_identity(self, fingerprint: str) -> dict[str, Any] | None:
        """The model identity remembered for a file fingerprint, if any."""
        path = self.root / "models" / f"{fingerprint}.json"
        try:
            identity = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(identity, dict) or not all(
                isinstance(identity.get(k), str) and len(identity[k]) == 64
                for k in ("weights_sha256", "tokenizer_sha256")) or (
                "checksum" in identity  # files written before issue 22 have none
                and identity["checksum"] != _sha256(_canonical(identity).encode())):
            log.warning("ignoring %s: not an intact model identity (the model is loaded to "
                        "hash it)", path)
            return None
        identity.pop("checksum", None)
        return identity

    def remember_identity(self, fingerprint: str, identity: dict[str, Any]) -> None:
        """Remember a model's identity for its file fingerprint (atomically, with a checksum
        of its content)."""
        body = {k: v for k, v in identity.items() if k != "checksum"}
        body["checksum"] = _sha256(_canonical(body).encode())
        atomic_write_text(self.root / "models" / f"{fingerprint}.json",
                          json.dumps(body, indent=2, sort_keys=True, default=str))


def as_store(store: ResultStore | str | os.PathLike[str] | None) -> ResultStore:
    """``store``, its folder, or None (:func:`~mechicl.experiments.store.default_store`) as
    a :class:`~mechicl.experiments.store.ResultStore`."""
    return store if isinstance(store, ResultStore) else ResultStore(store or default_store())


# ---- indexes of output folders -------------------------------------------------------------


def _index_checksum(entries: Mapping[str, Any]) -> str:
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


INDEX_FORMAT = 1
"""The ``index.json`` format (a file without ``format`` is of format 1)."""


def index_text(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """The content of an ``index.json``: ``{"format", "results": {name: {"key", "job",
    "seconds"}}, "checksum"}``."""
    body = {name: dict(entry) for name, entry in entries.items()}
    return json.dumps({"format": INDEX_FORMAT, "results": body,
                       "checksum": _index_checksum(body)}, indent=2, sort_keys=True, default=str)


def write_index(folder: str | os.PathLike[str], entries: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``folder/index.json`` (see :func:`index_text`), atomically."""
    return atomic_write_text(Path(folder) / INDEX_FILE, index_text(entries))


def read_index(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``folder/index.json``'s entries (empty if there is none).

    Raises:
        ResultError: the file is not valid JSON, of an unknown format or its checksum does not
            match.
    """
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["results"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ResultError(f"{path} is not a results index ({err})") from None
    found = data.get("format", INDEX_FORMAT)
    if type(found) is not int or found != INDEX_FORMAT:
        raise ResultError(f"{path}: format {found!r} is not {INDEX_FORMAT}, the index format "
                          "this mechicl reads")
    if not isinstance(entries, dict) or data.get("checksum") != _index_checksum(entries):
        raise ResultError(f"{path}: checksum mismatch (edited or corrupt)")
    return entries
