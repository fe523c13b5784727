"""Atomic file and folder writes: a reader never sees a half-written result, and an overwrite
never loses the old one.

A new file or folder is written next to its target and renamed onto it. Replacing a folder is
the hard case (``rename`` cannot overwrite a non-empty folder): on Linux the two folders are
swapped in one system call (``renameat2(RENAME_EXCHANGE)``), so at every moment the target is
either the complete old folder or the complete new one. Elsewhere (or on a file system without
the exchange) the old folder is renamed aside first and put back if the second rename fails;
if the process is killed between the two renames, the next :func:`atomic_path` on the same
target puts the old folder back before it writes.
"""

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "exchange", "pid_alive", "replace_folder"]

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


def _renameat2() -> object | None:
    if sys.platform != "linux":
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:  # pragma: no cover - no C library to ask
        return None


_RENAMEAT2 = _renameat2()


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        True if they were swapped; False if this system or file system cannot swap (then
        nothing changed).

    Raises:
        OSError: the swap failed for another reason (e.g. a path is missing).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     a, b = Path(tmp, "a"), Path(tmp, "b")
    ...     _ = a.write_text("A"), b.write_text("B")
    ...     swapped = exchange(a, b)
    ...     (a.read_text(), b.read_text()) == (("B", "A") if swapped else ("A", "B"))
    True
    """
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),  # type: ignore[operator]
                        _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_folder(new: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path | None:
    """Put the folder ``new`` at ``target``, which may exist (a folder); the old ``target`` is
    kept until the new one is in place.

    With :func:`exchange` the two are swapped in one step. Otherwise the old folder is renamed
    to ``new`` + ``".old"`` and renamed back if the second rename fails (whatever the error).

    Returns:
        Where the old folder is now (the caller removes it), or None if there was none.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return None
    if exchange(new, target):
        return new
    aside = new.with_name(new.name + ".old")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)  # the old result back where it was
        raise
    return aside


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{socket.gethostname()}-"


def _restore_leftovers(target: Path) -> None:
    """Put back an old folder left aside by a process of this host killed between the two
    renames of :func:`replace_folder` (only when ``target`` is missing), and remove the
    temporary folders of dead processes for ``target``."""
    prefix = _tmp_prefix(target)
    for tmp in target.parent.glob(f"{_glob_escape(prefix)}*"):
        pid = tmp.name.removeprefix(prefix).split("-", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        aside = tmp / (target.name + ".old")
        if aside.exists() and not target.exists():
            os.replace(aside, target)
            log.warning("restored %s, left aside by a killed process", target)
        shutil.rmtree(tmp, ignore_errors=True)


def _glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped (for :meth:`pathlib.Path.glob`).

    >>> _glob_escape("a[1]*.txt")
    'a[[]1[]][*].txt'
    """
    return "".join(f"[{c}]" if c in "[]*?" else c for c in text)


def pid_alive(pid: int) -> bool:
    """A process ``pid`` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` on success.

    Works for a file or a folder written at the yielded path. On error the temporary is
    removed and ``path`` is left as it was. An existing folder at ``path`` is replaced by
    :func:`replace_folder`: it stays complete until the new one is in place, whatever fails.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _restore_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(target)}{os.getpid()}-", suffix=".tmp",
                                dir=target.parent))
    inner = tmp / target.name
    try:
        yield inner
        if not inner.exists():
            raise FileNotFoundError(f"nothing was written at {inner}")
        if inner.is_dir() and target.is_dir() and not target.is_symlink():
            replace_folder(inner, target)  # the old folder ends inside tmp, removed below
        else:
            os.replace(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
