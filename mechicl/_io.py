"""Atomic file and folder writes: a reader never sees a half-written result."""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Works for a file or a folder written at the yielded path. On error the temporary
    is removed and ``path`` is left as it was. The rename is atomic on POSIX because
    the temporary lives in the same directory.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    inner = tmp / target.name
    try:
        yield inner
        if not inner.exists():
            raise FileNotFoundError(f"nothing was written at {inner}")
        if inner.is_dir() and target.is_dir():
            # os.replace cannot overwrite a non-empty folder: move the old one aside first.
            old = tmp / (target.name + ".old")
            os.replace(target, old)
        os.replace(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_meta_and_table(path: str | os.PathLike[str], meta: dict[str, Any], meta_name: str,
                         table: pd.DataFrame, table_name: str) -> Path:
    """A result folder with ``meta_name`` (JSON) and ``table_name`` (parquet), atomically."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / meta_name).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        table.to_parquet(tmp / table_name, index=False)
    return Path(path)


def read_meta_and_table(path: str | os.PathLike[str], kind: str, meta_name: str,
                        table_name: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """(meta, table) of a folder written by :func:`write_meta_and_table`; checks its kind."""
    path = Path(path)
    meta = json.loads((path / meta_name).read_text(encoding="utf-8"))
    if meta.get("kind") != kind:
        raise ValueError(f"{path} does not hold a {kind} (kind={meta.get('kind')!r})")
    return meta, pd.read_parquet(path / table_name)
