"""The entry types of one log: write an entry only if it loads back equal, check a file.

:func:`entry_types` turns what a caller passes as ``entry_types=`` into an
:class:`EntryTypes` (cached: logs are made often, decoders once). The built-in types are
always part of it.

Error handling:
    ``TypeError`` for an entry of a type that is not registered (a subclass of a
    registered type included: it would be written as its base) and for a class that
    cannot be registered; ``ValueError`` for an entry whose value would not load back
    equal (a NaN, a value that skipped validation), naming the field and the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Iterable
from typing import Any, Union

import msgspec
from pydantic import BaseModel, ValidationError

from .entries import BUILTIN_TYPES, FeedbackContent
from .entry_schema import Codec, codec_for, own_fields, register_hint
from .exact import find_change, find_unencodable
from .nonfinite import NONFINITE_FIX, find_nonfinite, may_hold_nonfinite

__all__ = ["FIELDS_ENCODER", "EntryTypes", "RawTag", "entry_types", "plain_lines"]

_BYPASS = ("(model_copy(update=...) and model_construct skip validation: build it with "
           "{name}(...) or {name}.model_validate(...))")
# msgspec Structs and dataclasses check no types when built: the value is simply wrong.
_WRONG_TYPE = "(a {kind} does not check its fields' types when built: pass a value of the " \
    "declared type)"


# A model that validates as it is but not from its own JSON: the class is the problem.
_OWN_JSON = ("({name} validates as built, but not from the JSON it is written as: a nested "
             "model with a field alias is written by field name and read by alias, or a "
             "validator refuses what the model dumps; drop the alias or fix the validator)")


def _bypass_hint(cls: type, entry: Any) -> str:
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        return _WRONG_TYPE.format(kind="msgspec Struct")
    if dataclasses.is_dataclass(cls):
        return _WRONG_TYPE.format(kind="dataclass")
    try:  # only a value that skipped validation (nested ones too) fails it again
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the serializer's warnings about such values
            cls.model_validate(entry.model_dump(by_alias=True))  # type: ignore[attr-defined]
    except Exception:
        return _BYPASS.format(name=cls.__name__)
    return _OWN_JSON.format(name=cls.__name__)


def _fields(obj: object) -> Any:
    # msgspec calls this for a nested pydantic model (Feedback's content): its fields.
    if type(obj) is FeedbackContent or isinstance(obj, BaseModel):
        d = obj.__dict__
        fields = type(obj).__pydantic_fields__
        if len(d) == len(fields):
            return d
        # More than the fields: what a functools.cached_property cached once read.
        return {name: d[name] for name in fields}
    raise NotImplementedError(f"cannot encode {type(obj).__name__} in a memory entry")


# A pydantic model's __dict__ holds its field values, in declaration order ("type"
# first), so encoding it gives the guide's bytes without building a dict (and only the
# fields when a cached_property has added to it).
FIELDS_ENCODER = msgspec.json.Encoder(enc_hook=_fields)
_PLAIN = msgspec.json.Decoder()


class RawTag(msgspec.Struct):
    """What raw mode checks of a line: an object with a string ``type``."""

    type: str


class EntryTypes:
    """The registered entry types of a log: the built-ins and the caller's own.

    Attributes:
        by_cls: class -> codec.
        by_tag: tag -> codec.
        build: mirror class -> builder of the entry object.
        build_many: mirror class -> builder of a list of them (where there is one).
        decoder: checks and decodes lines of any registered type, by their tag.
    """

    def __init__(self, classes: tuple[type, ...]) -> None:
        self.classes = classes
        self.by_cls: dict[type, Codec] = {}
        self.by_tag: dict[str, Codec] = {}
        for cls in (*BUILTIN_TYPES, *classes):
            if cls in self.by_cls:
                continue
            codec = codec_for(cls)
            other = self.by_tag.get(codec.tag)
            if other is not None:
                raise TypeError(
                    f"{cls.__name__} and {other.cls.__name__} both have the tag "
                    f"{codec.tag!r}; give {cls.__name__} its own: a first field "
                    f"`type: Literal[{cls.__name__!r}] = {cls.__name__!r}`"
                )
            self.by_cls[cls] = codec
            self.by_tag[codec.tag] = codec
        self.build = {c.mirror: c.build for c in self.by_cls.values()}
        self.build_many = {c.mirror: c.build_many for c in self.by_cls.values()
                           if c.build_many is not None}
        self.tag_of_mirror = {c.mirror: c.tag for c in self.by_cls.values()}
        mirrors = tuple(c.mirror for c in self.by_cls.values())
        self.decoder = msgspec.json.Decoder(Union[mirrors])  # noqa: UP007 (a tuple of types)
        self._check = {c.cls: msgspec.json.Decoder(c.mirror) for c in self.by_cls.values()}

    @property
    def tags(self) -> list[str]:
        """Every registered tag, built-ins first."""
        return list(self.by_tag)

    def encode_checked(self, entry: Any, buf: bytearray) -> None:
        """Append ``entry``'s JSON line (no newline) to ``buf``, if it loads back equal.

        Raises:
            TypeError: the entry's type is not registered.
            ValueError: the entry would not load back equal (the message says why).
        """
        codec = self.by_cls.get(type(entry))
        if codec is None:
            raise TypeError(self._unregistered(entry))
        try:
            line = FIELDS_ENCODER.encode(codec.as_encodable(entry))
        except (NotImplementedError, TypeError, msgspec.EncodeError) as exc:
            name = codec.cls.__name__
            found = find_unencodable(entry, name) or f"{name} cannot be encoded ({exc})"
            raise TypeError(f"cannot append {name} entry: {found}") from None
        if codec.prefix is not None:
            line = codec.prefix + line[1:] if line != b"{}" else codec.prefix[:-1] + b"}"
        self._verify(codec, entry, line)
        buf += line

    def _verify(self, codec: Codec, entry: Any, line: bytes) -> None:
        # Decoded as a load decodes it, built as a read builds it, compared: what append
        # accepts loads back equal. A NaN (written as null) always fails here, so the
        # walk that names its path runs only then.
        name = codec.cls.__name__
        try:
            back = codec.build(self._check[codec.cls].decode(line))
        except msgspec.ValidationError as exc:
            problem = _msgspec_problem(name, str(exc)) + " " + _bypass_hint(codec.cls, entry)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                   for p in err["loc"])
            problem = f"{where}: {err['msg']} " + _bypass_hint(codec.cls, entry)
        else:
            if back == entry:
                # Equal is not the same: an enum in an Any field loads back as its value.
                found = find_change(entry, back, name)
                if found is None:
                    return
                raise ValueError(f"cannot append {name} entry: {found}")
            problem = _difference(name, entry, back)
        if may_hold_nonfinite(line) and (bad := find_nonfinite(entry, name)) is not None:
            problem = f"{bad}: {NONFINITE_FIX}"
        raise ValueError(f"cannot append {name} entry: {problem}")

    def _unregistered(self, entry: Any) -> str:
        cls = type(entry)
        name = cls.__name__
        base = next((c for c in cls.__mro__[1:] if c in self.by_cls), None)
        if base is not None:
            own = own_fields(cls, base)
            what = (f"with its own fields ({', '.join(own)})" if own
                    else "without fields of its own")
            return (
                f"{name} is a subclass of {base.__name__} {what}, and is not a "
                f"registered entry type: it would be written as a plain {base.__name__} "
                f"and come back as one. Register it: give it its own tag (a first field "
                f"`type: Literal[{cls.__name__!r}] = {cls.__name__!r}`) and "
                + register_hint(name)
            )
        known = ", ".join(c.__name__ for c in self.by_cls)
        if issubclass(cls, (BaseModel, msgspec.Struct)) or dataclasses.is_dataclass(cls):
            return (
                f"MemoryLog entries must be one of the registered types ({known}); to store "
                f"{name} (a frozen pydantic model, msgspec Struct or dataclass), "
                + register_hint(name) + f"; got {name}"
            )
        head = f"MemoryLog entries must be one of the registered types ({known}); got {name}"
        tag = entry.get("type") if isinstance(entry, dict) else None
        codec = self.by_tag.get(tag) if isinstance(tag, str) else None
        if codec is not None:  # the fields of a registered type, as a plain dict
            return f"{head}, not an entry: build the entry from it, {_build_hint(codec.cls)}"
        return (f"{head}, which cannot be an entry type: entries are frozen pydantic models, "
                f"msgspec Structs or dataclasses; declare one with a field for the {name} "
                "and " + register_hint("YourEntry"))


def _build_hint(cls: type) -> str:
    """How to build an entry of ``cls`` from a dict ``d`` of its line."""
    name = cls.__name__
    if issubclass(cls, BaseModel):
        return f"{name}.model_validate(d)"
    if issubclass(cls, msgspec.Struct):
        return f"msgspec.convert(d, type={name})"
    return f"{name}(**{{k: v for k, v in d.items() if k != 'type'}})"


def _msgspec_problem(name: str, message: str) -> str:
    # "Expected `str`, got `object` - at `$.content`" -> "Cls.content: expected ..."
    m = re.match(r"^(.*?)(?: - at `\$(.*)`)?$", message)
    assert m is not None
    problem, path = m.group(1), m.group(2) or ""
    return f"{name}{path}: {problem[:1].lower()}{problem[1:]}"


def _difference(name: str, entry: Any, back: Any) -> str:
    for field, value in _items(entry):
        again = getattr(back, field, None)
        if again != value:
            where, value, again = _innermost(f"{name}.{field}", value, again)
            return (f"{where} = {value!r} would load back as {again!r}; store a value "
                    "that JSON keeps as it is")
    return f"it would load back as {back!r}, not equal to {entry!r}"


def _innermost(where: str, value: Any, again: Any, depth: int = 0) -> tuple[str, Any, Any]:
    """The deepest key or index at which ``value`` and ``again`` (unequal) differ."""
    if depth < 100 and isinstance(value, dict) and isinstance(again, dict):
        for k, v in value.items():
            if k in again and again[k] != v:
                return _innermost(f"{where}[{k!r}]", v, again[k], depth + 1)
    if depth < 100 and isinstance(value, (list, tuple)) and isinstance(again, list) \
            and len(value) == len(again):
        for i, (v, a) in enumerate(zip(value, again, strict=True)):
            if v != a:
                return _innermost(f"{where}[{i}]", v, a, depth + 1)
    return where, value, again


def _items(entry: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(entry, BaseModel):
        return ((f, getattr(entry, f)) for f in type(entry).__pydantic_fields__)
    if isinstance(entry, msgspec.Struct):
        return ((f, getattr(entry, f)) for f in entry.__struct_fields__)
    return ((f.name, getattr(entry, f.name)) for f in dataclasses.fields(entry))


@functools.lru_cache(maxsize=64)
def _cached(classes: tuple[type, ...]) -> EntryTypes:
    return EntryTypes(classes)


def entry_types(classes: Iterable[type] = ()) -> EntryTypes:
    """The :class:`EntryTypes` of the built-ins plus ``classes``.

    Raises:
        TypeError: a class cannot be an entry type, or two share a tag.
    """
    key = tuple(dict.fromkeys(classes))
    try:
        return _cached(key)
    except TypeError as exc:
        if "unhashable" in str(exc):
            raise TypeError(f"entry_types must hold classes, got {key!r}") from None
        raise


def plain_lines(data: bytes | memoryview) -> list[Any]:
    """Every line of ``data`` as plain JSON values (raw mode)."""
    return _PLAIN.decode_lines(data)
