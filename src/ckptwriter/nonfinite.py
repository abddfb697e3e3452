"""Find a NaN or an infinity inside a value that is about to be written as JSON.

JSON has neither: msgspec writes them as ``null``, so a value holding one would come back
as ``None`` (or not load at all). Memory entries and ``extra_files`` are refused where
they are made instead, with the path to the offending float inside the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgspec
from pydantic import BaseModel

__all__ = [
    "NONFINITE_FIX", "find_nonfinite", "find_unencodable_text", "may_hold_nonfinite",
]

NONFINITE_FIX = (
    "JSON has no NaN or infinity (it would be written as null and not come back): "
    "replace it, e.g. with None or a string, before storing it"
)


def may_hold_nonfinite(encoded: bytes | bytearray | memoryview) -> bool:
    """False when ``encoded`` (msgspec JSON) cannot hold a NaN or an infinity.

    msgspec writes both as ``null``: a document without that word needs no walk, which
    keeps the check O(1) Python work for most values (a memchr-speed scan).
    """
    return b"null" in encoded


_LEAVES: frozenset[type] = frozenset({str, int, bool, type(None), bytes})


def _nonfinite(value: Any) -> bool | None:
    """True for a NaN or infinity, False for another leaf, None for a container."""
    if type(value) is float or isinstance(value, float):
        return value - value != 0.0  # NaN for NaN and both infinities
    return False if type(value) in _LEAVES else None


def _unencodable(value: Any) -> bool | None:
    """True for a str UTF-8 cannot encode (a lone surrogate), False for another leaf."""
    if isinstance(value, str):
        return not _is_utf8(value)
    return False if type(value) in _LEAVES or isinstance(value, float) else None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find(value: Any, bad: Callable[[Any], bool | None] = _nonfinite,
          skip: frozenset[type] = _LEAVES) -> list[str] | None:
    """The steps to the first leaf ``bad`` flags in ``value``, innermost first, or None.

    Leaves of a type in ``skip`` are never looked at (a str cannot be a NaN); a dict key
    ``bad`` flags is a step of its own, ``[key] (a key)``.
    """
    flag = bad(value)
    if flag is not None:
        return [] if flag else None
    t = type(value)
    if t is dict or isinstance(value, dict):
        for k in value:
            if type(k) not in skip and bad(k):
                return [f"[{k!r}] (a key)"]
        items: Any = ((f"[{k!r}]", v) for k, v in value.items() if type(v) not in skip)
    elif t is list or t is tuple or isinstance(value, (list, tuple, set, frozenset)):
        items = ((f"[{i}]", v) for i, v in enumerate(value) if type(v) not in skip)
    elif isinstance(value, BaseModel):
        items = ((f".{k}", v) for k, v in value.__dict__.items())
    elif isinstance(value, msgspec.Struct):
        items = ((f".{f}", getattr(value, f)) for f in value.__struct_fields__)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return None
    for step, child in items:
        path = _find(child, bad, skip)
        if path is not None:
            path.append(step)
            return path
    return None


def find_unencodable_text(value: Any) -> str | None:
    """The path (``.content``, ``['k'][2]``, ``['\\ud800'] (a key)``) to the first string
    inside ``value`` that UTF-8 cannot encode, ``""`` for ``value`` itself, or None."""
    try:
        path = _find(value, _unencodable, frozenset({int, bool, type(None), bytes}))
    except RecursionError:
        return None
    return None if path is None else "".join(reversed(path))


def find_nonfinite(value: Any, root: str = "") -> str | None:
    """``root`` and the path to the first NaN or infinity inside ``value``, or None.

    Walks dicts, lists, tuples, sets, pydantic models, msgspec Structs and dataclasses;
    the path is only built for the float it finds, so a clean value costs one type
    check per element.
    """
    try:
        path = _find(value)
    except RecursionError:
        return None  # deeper than any encoder goes: the encoder reports it
    if path is None:
        return None
    where = root + "".join(reversed(path))
    bad = value
    for step in reversed(path):
        bad = _step(bad, step)
    return f"{where} is {bad!r}"


def _step(value: Any, step: str) -> Any:
    if step.startswith("."):
        return getattr(value, step[1:])
    if isinstance(value, dict):
        return next(v for k, v in value.items() if f"[{k!r}]" == step)
    return list(value)[int(step[1:-1])]
