"""Did a value come back from JSON as it was handed over: the same types, not only equal?

Equal is not enough. An IntEnum or a str Enum compares equal to the int or str it loads
back as, a defaultdict to a plain dict, the int 2 in a dataclass's ``float`` field to the
2.0 it loads back as, a datetime in ``ZoneInfo("Europe/Paris")`` to the same instant at a
fixed ``+02:00`` (which is wrong after the next DST change), a time in a ZoneInfo to a
naive time. :func:`find_change` walks the value handed over and the value loaded back
side by side (containers, model fields) and names the first place their types differ,
with the fix. It runs only after the two compare equal, so it looks at types alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from collections.abc import Iterable
from itertools import repeat
from typing import Any

import msgspec
from pydantic import BaseModel
from pydantic_core import TzInfo

__all__ = ["a_noun", "find_change", "find_unencodable", "subclass_problem"]

_LEAVES: frozenset[type] = frozenset({str, int, float, bool, type(None), bytes, bytearray})
_SUBCLASS_FIX = {dict: "dict(value)", list: "list(value)", str: "str(value)",
                 int: "int(value)", float: "float(value)"}
# What msgspec writes as JSON as it is (besides enums, containers and models).
_ENCODABLE = frozenset({str, int, float, bool, type(None), bytes, bytearray, uuid.UUID,
                        datetime.datetime, datetime.date, datetime.time,
                        datetime.timedelta, decimal.Decimal})
# The fixed-offset time zones JSON keeps exactly (pydantic's TzInfo is what it makes of
# "+02:00"; msgspec gives the same offset back as a datetime.timezone).
_FIXED = (datetime.timezone, TzInfo)


def a_noun(noun: str) -> str:
    """``a list``, ``an object``: the article a message needs."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def subclass_problem(value: Any, path: str) -> str | None:
    """What is wrong with an enum or another subclass of a JSON type, or None."""
    t = type(value)
    if isinstance(value, enum.Enum):
        return (f"{path} is {t.__name__}.{value.name} (an enum): it would load back as "
                f"its plain value {value.value!r}; store {t.__name__}.{value.name}.value "
                f"and rebuild it with {t.__name__}(value) after loading")
    for base, fix in _SUBCLASS_FIX.items():
        if isinstance(value, base) and t is not base and t is not bool:
            return (f"{path} is {a_noun(t.__name__)} (a subclass of {base.__name__}): it "
                    f"would load back as a plain {base.__name__}; convert it with {fix}")
    return None


def find_change(given: Any, back: Any, path: str) -> str | None:
    """Where ``back`` (``given`` loaded back, and equal to it) is not what ``given`` was.

    Linear in the size of the value; the path is only built for the difference found.

    Returns:
        a message naming the path inside the value, what it would load back as and the
        fix; None when every type (and time zone) is the same.
    """
    try:
        found = _diff(given, back)
    except RecursionError:
        return None  # deeper than the encoder goes: the encoder has refused it already
    except (KeyError, AttributeError, TypeError, ValueError):
        # A shape the walk does not know (the two compared equal): a value the
        # encoder and == accept is not refused for a gap in this second look.
        return None
    if found is None:
        return None
    g, b, steps = found
    where = path + "".join(reversed(steps))
    if type(g) is not type(b):
        return _type_change(g, b, where)
    if isinstance(g, decimal.Decimal):
        return f"{where} = {g!r} would load back as {b!r}; store it as a str"
    return _zone_change(g, b, where)


# What each type is to the walk, found once per type (a dict lookup per value after).
_LEAF, _DICT, _SEQ, _SET, _ZONED, _DECIMAL, _MODEL, _STRUCT, _DATACLASS = range(9)
_KINDS: dict[type, int] = dict.fromkeys(_LEAVES, _LEAF)


def _kind(t: type) -> int:
    if len(_KINDS) > 4096:  # classes made on the fly: keep the cache bounded
        _KINDS.clear()
        _KINDS.update(dict.fromkeys(_LEAVES, _LEAF))
    kind = (_DICT if issubclass(t, dict) else _SEQ if issubclass(t, (list, tuple))
            else _SET if issubclass(t, (set, frozenset))
            else _ZONED if issubclass(t, (datetime.datetime, datetime.time))
            else _DECIMAL if issubclass(t, decimal.Decimal)
            else _MODEL if issubclass(t, BaseModel)
            else _STRUCT if issubclass(t, msgspec.Struct)
            else _DATACLASS if dataclasses.is_dataclass(t) else _LEAF)
    _KINDS[t] = kind
    return kind


_Found = tuple[Any, Any, list[str]]


def _diff(given: Any, back: Any) -> _Found | None:
    """The first two values that differ, and the steps to them (innermost first)."""
    t = type(given)
    if t is not type(back):
        return given, back, []
    kind = _KINDS.get(t)
    if kind is None:
        kind = _kind(t)
    if kind == _LEAF or given is back:
        return None
    if kind == _DICT:
        return _dict_diff(given, back)
    if kind == _MODEL:
        # The fields only: __dict__ also holds what a functools.cached_property cached,
        # which == ignores and the loaded copy has not computed.
        names = list(t.model_fields)
        d, bd = given.__dict__, back.__dict__
        return _zip_diff(".{}", names, map(d.__getitem__, names), map(bd.__getitem__, names))
    if kind == _SEQ:
        return _zip_diff("[{}]", range(len(given)), given, back)
    if kind == _SET:
        same = {b: b for b in back}  # the loaded element equal to each given one
        return _zip_diff(" item {!r}", given, given, map(same.__getitem__, given))
    if kind == _ZONED:
        return None if _same_zone(given, back) else (given, back, [])
    if kind == _DECIMAL:
        return None if str(given) == str(back) else (given, back, [])
    if kind == _STRUCT:
        return _zip_diff(".{}", given.__struct_fields__, msgspec.structs.astuple(given),
                         msgspec.structs.astuple(back))
    names = [f.name for f in dataclasses.fields(given)]
    return _zip_diff(".{}", names, map(getattr, repeat(given), names),
                     map(getattr, repeat(back), names))


def _zip_diff(step: str, keys: Iterable[Any], given: Iterable[Any],
              back: Iterable[Any]) -> _Found | None:
    """The first difference of ``given`` and ``back`` (in step); ``step`` words a key."""
    leaves = _LEAVES
    for key, g, b in zip(keys, given, back, strict=True):
        t = type(g)
        if t is type(b) and t in leaves:
            continue  # most values: no call, no path
        found = _diff(g, b)
        if found is not None:
            found[2].append(step.format(key))
            return found
    return None


def _dict_diff(given: dict[Any, Any], back: dict[Any, Any]) -> _Found | None:
    keys: dict[Any, Any] | None = None
    leaves = _LEAVES
    for (k, v), (kb, vb) in zip(given.items(), back.items(), strict=True):
        if k is not kb and (type(k) is not type(kb) or k != kb):
            if keys is None:  # another order (a sorted encode): match keys by equality
                keys = {key: key for key in back}
            kb = keys.get(k, k)
            vb = back[k]
        if type(k) is not type(kb):
            return k, kb, [f" key {k!r}"]
        t = type(v)
        if t is type(vb) and t in leaves:
            continue
        found = _diff(v, vb)
        if found is not None:
            found[2].append(f"[{k!r}]")
            return found
    return None


def _fields(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, BaseModel):
        d = value.__dict__
        return [(f, d[f]) for f in type(value).model_fields]
    if isinstance(value, msgspec.Struct):
        return [(f, getattr(value, f)) for f in value.__struct_fields__]
    return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]


def _same_zone(given: datetime.datetime | datetime.time,
               back: datetime.datetime | datetime.time) -> bool:
    tz, tz_back = given.tzinfo, back.tzinfo
    return given.fold == back.fold and (tz is tz_back or (
        isinstance(tz, _FIXED) and isinstance(tz_back, _FIXED)
        and given.utcoffset() == back.utcoffset()
        and (type(tz) is not datetime.timezone or given.tzname() == back.tzname())))


def _zone_change(given: datetime.datetime | datetime.time,
                 back: datetime.datetime | datetime.time, path: str) -> str:
    tz = given.tzinfo
    if given.fold != back.fold:
        return (f"{path} = {given!r} has fold=1, which JSON does not keep: it would load "
                f"back as {back!r}; store it in UTC (value.astimezone(timezone.utc))")
    if isinstance(given, datetime.time):
        return (f"{path} is a time in the time zone {tz}, which JSON does not keep (a time "
                f"has no UTC offset in such a zone): it would load back as {back!r}; store "
                "a datetime, or a time with a fixed offset (datetime.timezone), and the "
                "zone name in a field of its own")
    return (f"{path} is a datetime in the time zone {tz}: JSON keeps only its UTC offset, "
            f"so it would load back with the fixed offset {back.tzinfo} (wrong after a "
            "daylight saving change); store it with a fixed offset, e.g. "
            "value.astimezone(timezone.utc), and the zone name in a field of its own")


def _type_change(given: Any, back: Any, path: str) -> str:
    if isinstance(given, enum.Enum):
        t = type(given)
        return (f"{path} is {t.__name__}.{given.name} (an enum) in a field that does not "
                f"declare {t.__name__}: it would load back as {back!r}; declare the field's "
                f"type as {t.__name__}, or store {t.__name__}.{given.name}.value")
    if type(given) is int and type(back) is float:
        return (f"{path} is the int {given!r} in a float field: it would load back as the "
                f"float {back!r}; pass float({given!r})")
    if (sub := subclass_problem(given, path)) is not None:
        return sub
    return (f"{path} = {given!r} ({type(given).__name__}) would load back as {back!r} "
            f"({type(back).__name__}); store a value of the type it loads back as")


def find_unencodable(value: Any, path: str) -> str | None:
    """The first value inside ``value`` that a JSON line cannot hold, worded with the fix.

    For an encode that failed: a numpy scalar, a str subclass, any other object in an
    ``Any`` field. None if there is none (the encoder failed for another reason).
    """
    try:
        return _unencodable(value, path)
    except RecursionError:
        return None


def _unencodable(value: Any, path: str) -> str | None:
    t = type(value)
    if t in _ENCODABLE or isinstance(value, enum.Enum):
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = (_unencodable(k, f"{path} key {k!r}")
                     or _unencodable(v, f"{path}[{k!r}]"))
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            if (found := _unencodable(v, f"{path}[{i}]")) is not None:
                return found
        return None
    if isinstance(value, (BaseModel, msgspec.Struct)) or (
            dataclasses.is_dataclass(value) and not isinstance(value, type)):
        for name, v in _fields(value):
            if (found := _unencodable(v, f"{path}.{name}")) is not None:
                return found
        return None
    if (sub := subclass_problem(value, path)) is not None:
        return sub
    numpy = " (for a numpy value: value.item())" if t.__module__.startswith("numpy") else ""
    return (f"{path} is {a_noun(t.__name__)} ({t.__module__}.{t.__qualname__}), which a "
            f"JSON line cannot hold: convert it to plain data{numpy}, or declare the field "
            f"with a type the class validates to plain data")
