"""A user's entry type, understood once: its tag, how it is written, checked and rebuilt.

A registered class (a frozen pydantic model, msgspec Struct or dataclass) becomes a
:class:`Codec`. Its *mirror* is a tagged msgspec Struct with the same fields, so that a
memory file of any mix of types is checked by one msgspec ``decode_lines`` call, in C;
an entry object is built from a mirror only when the entry is read.

A field type the mirror cannot express (a validator's custom type, a union of models)
is checked as ``Any`` on load and fully by the class when the entry is built; what
``append`` accepted was checked both ways, so it always loads back.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from pydantic import BaseModel, TypeAdapter

from .entries import BUILTIN_MIRRORS

__all__ = ["Codec", "codec_for", "own_fields"]

_SCALARS = (str, int, float, bool, bytes, bytearray, type(None), datetime.datetime,
            datetime.date, datetime.time, datetime.timedelta, uuid.UUID, decimal.Decimal)
_SEQUENCES: dict[Any, Any] = {list: list, tuple: tuple, set: set, frozenset: frozenset,
              Sequence: list, typing.Sequence: list}
_REGISTER = ("pass it as MemoryLog(entry_types=[{name}]) and "
             "load_checkpoint(..., entry_types=[{name}])")


@dataclass(frozen=True)
class Codec:
    """How one entry type is written, checked on load, and rebuilt.

    Attributes:
        tag: the ``type`` value that starts each of its JSON lines.
        cls: the user's class.
        mirror: a tagged msgspec Struct with the class's fields (what a line must be).
        build: mirror instance -> an instance of ``cls``.
        as_encodable: entry -> what msgspec encodes (a dict in field order, or itself).
        prefix: ``{"type":"Tag",`` when the class has no ``type`` field of its own.
        build_many: mirror instances -> entries, one call for a batch (what ``build``
            gives for each, faster), or None where only ``build`` is exact.
    """

    tag: str
    cls: type
    mirror: type[msgspec.Struct]
    build: Callable[[Any], Any]
    as_encodable: Callable[[Any], Any]
    prefix: bytes | None
    build_many: Callable[[list[Any]], list[Any]] | None = None


def _refuse(cls: type, problem: str) -> TypeError:
    return TypeError(f"cannot use {cls.__name__} as a memory entry type: {problem}")


def _mirror_type(tp: Any) -> Any:
    """The msgspec type that checks what ``tp`` holds, as far as msgspec can say."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _mirror_type(args[0])
    if tp is Any or tp in _SCALARS or origin is Literal:
        return tp
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            # Checked as an object here, fully by pydantic when the entry is built (a
            # nested mirror could not tell a missing field from one the model defaults).
            return dict[str, Any]
        if issubclass(tp, (msgspec.Struct, enum.Enum)) or dataclasses.is_dataclass(tp):
            return tp
    if origin in (Union, types.UnionType):
        return Union[tuple(_mirror_type(a) for a in args)]  # noqa: UP007 (a tuple)
    if origin in _SEQUENCES and args:
        if _SEQUENCES[origin] is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple[_mirror_type(args[0]), ...]  # type: ignore[misc]
        inner = tuple(_mirror_type(a) for a in args)
        return _SEQUENCES[origin][inner if _SEQUENCES[origin] is tuple else inner[0]]
    if origin in (dict, Mapping, typing.Mapping) and len(args) == 2:
        return dict[_mirror_type(args[0]), _mirror_type(args[1])]  # type: ignore[misc]
    return Any  # the class checks it when the entry is built


def _usable(tp: Any) -> Any:
    """``tp`` if msgspec can decode it, else ``Any`` (a union msgspec does not support)."""
    try:
        msgspec.json.Decoder(tp)
    except TypeError:
        return Any
    return tp


def _mirror(cls: type, tag: str, spec: list[tuple[str, str, Any, bool]]) -> Any:
    """A tagged Struct of ``spec`` (name, JSON key, type, has a default), ``type`` left out.

    A field with a default is UNSET when a line lacks it, so the class fills in its own.
    """
    fields = [
        (name, Union[tp, msgspec.UnsetType] if has_default else tp,  # noqa: UP007
         msgspec.field(default=msgspec.UNSET, name=key) if has_default
         else msgspec.field(name=key))
        for name, key, tp, has_default in spec if key != "type"
    ]
    mirror = msgspec.defstruct(f"{cls.__name__}Mirror", fields, kw_only=True,
                               tag_field="type", tag=tag)
    try:
        msgspec.json.Decoder(mirror)
    except TypeError as exc:
        raise _refuse(cls, f"msgspec cannot decode its fields ({exc})") from None
    return mirror


def _set_fields(m: Any, names: tuple[str, ...]) -> dict[str, Any]:
    unset = msgspec.UNSET
    return {n: v for n in names if (v := getattr(m, n)) is not unset}


def _literal_tag(cls: type, tp: Any, default: Any) -> str:
    args = get_args(tp)
    if get_origin(tp) is not Literal or len(args) != 1 or not isinstance(args[0], str) \
            or default != args[0]:
        raise _refuse(cls, f"its `type` field must be `type: Literal[{cls.__name__!r}] = "
                           f"{cls.__name__!r}` (a one-value Literal and that default), got "
                           f"{tp!r} = {default!r}")
    return str(args[0])


def _pydantic(cls: type[BaseModel]) -> Codec:
    cfg = cls.model_config
    if not cfg.get("frozen"):
        raise _refuse(cls, "entries are immutable once appended; declare "
                           "model_config = ConfigDict(frozen=True)")
    if cfg.get("extra") == "allow":
        raise _refuse(cls, "extra='allow' fields are not part of the model's fields and "
                           "would not be stored; use extra='forbid'")
    fields = cls.model_fields
    for name, info in fields.items():
        if info.alias not in (None, name) or info.validation_alias not in (None, name):
            raise _refuse(cls, f"field {name!r} has an alias; entries are stored by field "
                               "name, so drop the alias")
    if "type" in fields:
        if next(iter(fields)) != "type":
            raise _refuse(cls, "declare the `type` field first: it is the first key of "
                               "every JSON line")
        tag, prefix = _literal_tag(cls, fields["type"].annotation, fields["type"].default), None
    else:
        tag, prefix = cls.__name__, _prefix(cls.__name__)
    mirror = _mirror(cls, tag, [(n, n, _usable(_mirror_type(i.annotation)),
                                 not i.is_required()) for n, i in fields.items()])
    names = tuple(n for n in fields if n != "type")
    validate = cls.__pydantic_validator__.validate_python

    def build(m: Any) -> Any:
        return validate(_set_fields(m, names))

    return Codec(tag, cls, mirror, build, _fields_dict, prefix, _validate_many(cls, mirror))


# Mirror field types that msgspec.to_builtins hands on as they are (with _AS_IS).
_KEPT = frozenset({Any, str, int, float, bool, type(None), msgspec.UnsetType, bytes,
                   bytearray, datetime.datetime, datetime.date, datetime.time,
                   datetime.timedelta, uuid.UUID, decimal.Decimal})
_AS_IS = (bytes, bytearray, datetime.datetime, datetime.date, datetime.time,
          datetime.timedelta, uuid.UUID, decimal.Decimal)


def _kept(tp: Any) -> bool:
    """True if ``to_builtins`` leaves a decoded value of mirror type ``tp`` as it is."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return all(type(a) in (str, int, bool) for a in args)
    if origin in (Union, types.UnionType, list, dict):
        return all(_kept(a) for a in args)
    return tp in _KEPT


def _validate_many(cls: type[BaseModel], mirror: Any) -> Callable[[list[Any]], list[Any]] | None:
    """A batch ``build`` for a pydantic class: the mirrors' fields as dicts (in C) and
    one validation of the list (in Rust), instead of a Python call per entry.

    Only where ``to_builtins`` gives each field's value as decoded (JSON values, no
    tuple, set, Struct or enum to turn into lists and dicts): the same dicts as
    ``build`` validates, so the same entries. None otherwise.
    """
    if not all(_kept(f.type) for f in msgspec.structs.fields(mirror)):
        return None
    adapter: Any = None

    def build_many(ms: list[Any]) -> list[Any]:
        nonlocal adapter
        if adapter is None:  # a few ms: only for a class a file is read back into
            adapter = TypeAdapter(list[cls])  # type: ignore[valid-type]
        dicts: list[dict[str, Any]] = msgspec.to_builtins(ms, builtin_types=_AS_IS)
        for d in dicts:
            del d["type"]  # as build: the tag is the class's default, not a field set
        out: list[Any] = adapter.validate_python(dicts)
        return out

    return build_many


def _fields_dict(entry: Any) -> Any:
    d = entry.__dict__
    fields = type(entry).__pydantic_fields__
    if len(d) == len(fields):
        return d
    # More than the fields: what a functools.cached_property cached once it was read
    # (== ignores it; written, it would load back as a field the class does not have).
    return {name: d[name] for name in fields}


def _own_dict(entry: Any) -> Any:
    # A built-in entry: its __dict__ is exactly its fields (no cached properties).
    return entry.__dict__


def _itself(entry: Any) -> Any:
    return entry


def _same(entries: list[Any]) -> list[Any]:
    return entries


def _prefix(tag: str) -> bytes:
    return b'{"type":' + msgspec.json.encode(tag) + b","


def _struct(cls: type[msgspec.Struct]) -> Codec:
    cfg = cls.__struct_config__
    if not cfg.frozen:
        raise _refuse(cls, "entries are immutable once appended; declare it with frozen=True")
    if cfg.array_like:
        raise _refuse(cls, "array_like=True has no keys, so no `type` key; drop array_like")
    fields = msgspec.structs.fields(cls)
    if cfg.tag_field is not None:
        if cfg.tag_field != "type":
            raise _refuse(cls, f"its tag_field is {cfg.tag_field!r}; use tag_field='type'")
        return Codec(str(cfg.tag), cls, cls, _itself, _itself, None, _same)
    names = [f.encode_name for f in fields]
    if "type" in names:
        if names[0] != "type":
            raise _refuse(cls, "declare the `type` field first: it is the first key of "
                               "every JSON line")
        if cfg.omit_defaults:
            raise _refuse(cls, "omit_defaults=True would leave out its `type` field")
        tag, prefix = _literal_tag(cls, fields[0].type, fields[0].default), None
    else:
        tag, prefix = cls.__name__, _prefix(cls.__name__)
    return _copied(cls, tag, prefix, [
        (f.name, f.encode_name, f.type,
         f.default is not msgspec.NODEFAULT or f.default_factory is not msgspec.NODEFAULT)
        for f in fields])


def _dataclass(cls: type) -> Codec:
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    if not params.frozen:
        raise _refuse(cls, "entries are immutable once appended; declare "
                           "@dataclass(frozen=True)")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(cls)
    if any(not f.init for f in fields):
        raise _refuse(cls, "a field with init=False cannot be rebuilt on load")
    if fields and fields[0].name == "type":
        tag, prefix = _literal_tag(cls, hints["type"], fields[0].default), None
    elif any(f.name == "type" for f in fields):
        raise _refuse(cls, "declare the `type` field first: it is the first key of every "
                           "JSON line")
    else:
        tag, prefix = cls.__name__, _prefix(cls.__name__)
    return _copied(cls, tag, prefix, [
        (f.name, f.name, hints[f.name], f.default is not dataclasses.MISSING
         or f.default_factory is not dataclasses.MISSING)
        for f in fields])


def _copied(cls: type, tag: str, prefix: bytes | None,
            spec: list[tuple[str, str, Any, bool]]) -> Codec:
    """A codec whose mirror copies the fields of a Struct or dataclass."""
    mirror = _mirror(cls, tag, spec)
    names = tuple(name for name, key, _, _ in spec if key != "type")

    def build(m: Any) -> Any:
        return cls(**_set_fields(m, names))

    return Codec(tag, cls, mirror, build, _itself, prefix)


def codec_for(cls: Any) -> Codec:
    """The codec of one entry type.

    Raises:
        TypeError: ``cls`` cannot be stored faithfully; the message says what to change.
    """
    if cls in BUILTIN_MIRRORS:
        mirror, build = BUILTIN_MIRRORS[cls]
        return Codec(cls.__name__, cls, mirror, build, _own_dict, None)
    if not isinstance(cls, type):
        raise TypeError(f"entry_types holds {cls!r}, not a class; pass classes, e.g. "
                        "entry_types=[ChatMessage]")
    if issubclass(cls, BaseModel):
        return _pydantic(cls)
    if issubclass(cls, msgspec.Struct):
        return _struct(cls)
    if dataclasses.is_dataclass(cls):
        return _dataclass(cls)
    raise _refuse(cls, "entry types are pydantic models, msgspec Structs or dataclasses")


def own_fields(cls: type, base: type) -> list[str]:
    """Fields ``cls`` declares beyond those of its registered base class ``base``."""

    def names(c: type) -> list[str]:
        if issubclass(c, BaseModel):
            return list(c.model_fields)
        if issubclass(c, msgspec.Struct):
            return list(c.__struct_fields__)
        if dataclasses.is_dataclass(c):
            return [f.name for f in dataclasses.fields(c)]
        return []

    have = set(names(base))
    return [n for n in names(cls) if n not in have]


def register_hint(name: str) -> str:
    """How to register the class called ``name`` (for error messages)."""
    return _REGISTER.format(name=name)
