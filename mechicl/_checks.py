"""Argument checks shared by the modules: clear errors naming the bad value and what is allowed."""

import operator
from collections.abc import Sequence
from typing import Any


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1 (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: need an integer >= 1")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 0 (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: need an integer >= 0")


def check_index(name: str, value: Any, size: int) -> int:
    """``value`` as an ``int`` if it is an integer in ``0..size-1``, else ``ValueError``.

    Integers include numpy integers and one-element integer tensors; bools are rejected
    (``True == 1`` in Python, so ``(True, 1)`` would silently name layer 1), and so are floats.

    >>> check_index("layer", 2, 4)
    2
    >>> check_index("layer", True, 4)
    Traceback (most recent call last):
    ValueError: layer=True: need an integer in 0..3
    """
    is_bool = isinstance(value, bool) or "bool" in str(getattr(value, "dtype", ""))
    try:
        index = None if is_bool else operator.index(value)
    except TypeError:
        index = None
    if index is None or not 0 <= index < size:
        raise ValueError(f"{name}={value!r}: need an integer in 0..{size - 1}")
    return index
