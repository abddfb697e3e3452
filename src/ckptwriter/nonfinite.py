"""Find a NaN or an infinity inside a value that is about to be written as JSON.

JSON has neither: msgspec writes them as ``null``, so a value holding one would come back
as ``None`` (or not load at all). Memory entries and ``extra_files`` are refused where
they are made instead, with the path to the offending float inside the value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from pydantic import BaseModel

__all__ = ["NONFINITE_FIX", "find_nonfinite", "may_hold_nonfinite"]

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


_LEAVES = frozenset({str, int, bool, type(None), bytes})


def _find(value: Any) -> list[str] | None:
    """The steps to a NaN or infinity in ``value``, innermost first, or None."""
    t = type(value)
    if t is float or isinstance(value, float):
        return [] if value - value != 0.0 else None  # NaN for NaN and both infinities
    if t is dict or isinstance(value, dict):
        items: Any = ((f"[{k!r}]", v) for k, v in value.items() if type(v) not in _LEAVES)
    elif t is list or t is tuple or isinstance(value, (list, tuple, set, frozenset)):
        items = ((f"[{i}]", v) for i, v in enumerate(value) if type(v) not in _LEAVES)
    elif isinstance(value, BaseModel):
        items = ((f".{k}", v) for k, v in value.__dict__.items())
    elif isinstance(value, msgspec.Struct):
        items = ((f".{f}", getattr(value, f)) for f in value.__struct_fields__)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return None
    for step, child in items:
        path = _find(child)
        if path is not None:
            path.append(step)
            return path
    return None


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
