"""One value of agent state, encoded once when it is set, and decoded when it is loaded.

Three kinds, each a file of its own in a checkpoint (``state.<key>.json`` or ``.bin``):

- ``bytes``: a bytes-like value, stored as it is.
- ``model``: a pydantic model, msgspec Struct or dataclass, through the very checked
  encode memory entries take (:mod:`ckptwriter.entry_codec`): its ``type`` tag first,
  then its fields; refused unless it loads back equal (a value that skipped validation,
  a NaN, a subclass that would be written as its base).
- ``json``: plain JSON data (dicts with str keys, lists, str, int, float, bool, None).
  Encoded by msgspec and decoded back at once: a value that would not load back equal
  (a tuple, a set, a non-str key, an object, a NaN) is refused with its path and the fix,
  which a walk of the value finds only then. Equal is not the same type: an IntEnum, a
  str Enum, a defaultdict or another subclass of a JSON type compares equal to the plain
  value it would load back as, so a value that round-trips is also checked to hold only
  exact builtin types (a C-speed pickler pass, see :func:`_exact`).

Error handling:
    ``ValueError`` for a NaN or infinity, or a lone surrogate in a string (the path
    inside the value is named);
    ``TypeError`` for anything else that would not load back equal (path and fix).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import pickle
from typing import Any

import msgspec
from pydantic import BaseModel

from .entry_codec import EntryTypes, entry_types
from .entry_schema import codec_for, own_fields
from .exact import a_noun, subclass_problem
from .nonfinite import NONFINITE_FIX

__all__ = [
    "EncodedValue", "class_path", "decode_value", "encode_json", "encode_value", "fingerprint",
]

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()
_JSON_FIX = ("store JSON data (dicts with str keys, lists, str, int, float, bool, None), "
             "bytes, or a frozen pydantic model / msgspec Struct / dataclass")


class EncodedValue(msgspec.Struct, frozen=True):
    """A state value as it is stored: its kind, its bytes, and for a model its class."""

    kind: str
    data: bytes
    cls: str | None = None
    tag: str | None = None


def class_path(cls: type) -> str:
    """``module:QualName`` of a class (recorded, never imported)."""
    return f"{cls.__module__}:{cls.__qualname__}"


@functools.lru_cache(maxsize=256)
def fingerprint(cls: type) -> str:
    """16 hex digits that change when the fields of an entry or state class change."""
    codec = codec_for(cls)
    try:
        schema = msgspec.json.encode(msgspec.json.schema(codec.mirror), order="sorted")
    except Exception:  # a field type msgspec has no schema for: the field names decide
        schema = repr(getattr(codec.mirror, "__struct_fields__", ())).encode()
    return hashlib.sha256(schema).hexdigest()[:16]


def _is_model(value: Any) -> bool:
    return isinstance(value, (BaseModel, msgspec.Struct)) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type))


def encode_value(key: str, value: Any) -> EncodedValue:
    """``value`` of state key ``key``, encoded once.

    Raises:
        ValueError: a NaN or infinity inside it.
        TypeError: it would not load back equal (the path and the fix are named).
    """
    where = f"state[{key!r}]"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return EncodedValue("bytes", bytes(value))
    if _is_model(value):
        return _encode_model(where, value)
    return EncodedValue("json", encode_json(value, where))


def encode_json(value: Any, where: str, *, encoder: msgspec.json.Encoder = _ENCODER,
                fix: str = _JSON_FIX, own: str = "a state value of its own") -> bytes:
    """``value`` as JSON, if it loads back exactly as it is (same values, same types).

    Args:
        value: plain JSON data.
        where: what to call it in messages (``state['k']``, ``extra_files['a.json']``).
        encoder: the encoder to use (one that sorts keys, for extra files).
        fix: what to store instead, added to a TypeError's message.
        own: where bytes or a model go instead ("a state value of its own").

    Raises:
        ValueError: a NaN or infinity, or a lone surrogate inside it (its path named).
        TypeError: it would not load back equal (the path and the fix are named).
    """
    try:
        data = encoder.encode(value)
    except (TypeError, msgspec.EncodeError, OverflowError, RecursionError, UnicodeError):
        data = None
    if data is not None:
        try:
            # Equal is not enough: an IntEnum, a str Enum, a defaultdict... compare equal
            # to the plain value they load back as. Their types tell.
            if _DECODER.decode(data) == value and _exact(value):
                return data
        except (msgspec.DecodeError, RecursionError):
            pass
    try:
        found = _problem(value, where, own)
    except RecursionError:
        found = (TypeError, f"{where} is nested too deep for JSON; flatten it")
    exc_type, problem = found or (TypeError, f"{where} would not load back equal from JSON")
    raise exc_type(f"{problem}; {fix}" if exc_type is TypeError else problem)


def _encode_model(where: str, value: Any) -> EncodedValue:
    cls = type(value)
    try:
        types = entry_types((cls,))
        codec = types.by_cls[cls]
        _refuse_shared_tag(cls, codec.tag)
        buf = bytearray()
        types.encode_checked(value, buf)
    except TypeError as exc:
        raise TypeError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return EncodedValue("model", bytes(buf), class_path(cls), codec.tag)


def _refuse_shared_tag(cls: type, tag: str) -> None:
    """A subclass that inherits its base's tag would load back as the base: refused."""
    for base in cls.__mro__[1:]:
        if base in (object, BaseModel, msgspec.Struct) or not (
                issubclass(base, (BaseModel, msgspec.Struct)) or dataclasses.is_dataclass(base)):
            continue
        try:
            same = codec_for(base).tag == tag
        except TypeError:
            continue
        if same:
            own = own_fields(cls, base)
            what = f"with its own fields ({', '.join(own)})" if own else "without fields of its own"
            raise TypeError(
                f"{cls.__name__} is a subclass of {base.__name__} {what} and has its tag "
                f"{tag!r}: it would load back as a plain {base.__name__}. Give it its own "
                f"tag: a first field `type: Literal[{cls.__name__!r}] = {cls.__name__!r}`")


_LEAVES = frozenset({str, int, float, bool, type(None)})


class _NotExact(Exception):
    pass


class _Discard:
    __slots__ = ()

    def write(self, data: bytes) -> int:
        return len(data)


class _ExactTypes(pickle.Pickler):
    """A pickler that stops at the first object not of an exact builtin type.

    ``reducer_override`` is not called for None, True, False and exact instances of
    int, float, str, bytes, dict, list, tuple, set and frozenset: the walk over those runs
    in C, at about the speed of the JSON encode itself.
    """

    def reducer_override(self, obj: Any) -> Any:
        raise _NotExact


def _exact(value: Any) -> bool:
    """True if ``value`` holds only exact JSON types (no subclass of any of them).

    Called on a value that loaded back equal, so it is JSON-shaped (no tuple or set:
    those load back unequal) and only the types can differ.
    """
    pickler = _ExactTypes(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
    pickler.fast = True  # no memo: the value has no cycles (it encoded as JSON)
    try:
        pickler.dump(value)
    except _NotExact:
        return False
    except RecursionError:
        return _exact_walk(value)
    return True


def _exact_walk(value: Any) -> bool:
    """:func:`_exact` without recursion (for values nested too deep for the pickler)."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            if not all(type(k) is str for k in v):
                return False
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
        elif t not in _LEAVES:
            return False
    return True


def _bad_text(text: str, path: str, own: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"{path} holds {text[exc.start:exc.end]!r} at index {exc.start}, a lone "
                "surrogate, which UTF-8 JSON cannot hold: fix the text (for example "
                "text.encode('utf-8', 'replace').decode()), or store bytes as "
                f"{own}")
    return None


def _problem(value: Any, path: str, own: str) -> tuple[type[Exception], str] | None:
    """The first thing inside ``value`` that JSON would not give back equal, or None."""
    t = type(value)
    if t is str:
        bad = _bad_text(value, path, own)
        return None if bad is None else (ValueError, bad)
    if t in (int, bool, type(None)):
        return None
    if t is float:
        return None if math.isfinite(value) else (ValueError,
                                                  f"{path} is {value!r}: {NONFINITE_FIX}")
    if t is list:
        for i, item in enumerate(value):
            if (found := _problem(item, f"{path}[{i}]", own)) is not None:
                return found
        return None
    if t is dict:
        for k, item in value.items():
            if type(k) is not str:
                return (TypeError, f"{path} has the key {k!r} ({type(k).__name__}): JSON keys "
                                   f"are strings, it would load back as {str(k)!r}; convert "
                                   "keys with str(key)")
            if (bad := _bad_text(k, f"{path} key {k!r}", own)) is not None:
                return ValueError, bad
            if (found := _problem(item, f"{path}[{k!r}]", own)) is not None:
                return found
        return None
    if t is tuple:
        return TypeError, f"{path} is a tuple: it would load back as a list; pass a list"
    if t in (set, frozenset):
        return TypeError, (f"{path} is {a_noun(t.__name__)}: it would load back as a list; pass a "
                           "sorted list")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return TypeError, (f"{path} is bytes inside JSON data: JSON has no bytes; store "
                           f"bytes as {own}")
    if (sub := subclass_problem(value, path)) is not None:
        return TypeError, sub
    if _is_model(value):
        return TypeError, (f"{path} is {a_noun(t.__name__)} inside JSON data: it would load back "
                           f"as a dict; store it as {own}, or convert it "
                           "(model_dump(), msgspec.to_builtins())")
    return TypeError, (f"{path} is {a_noun(t.__name__)}, which would not load back equal from "
                       "JSON")


def decode_value(enc: EncodedValue, types: EntryTypes | None, *, raw: bool) -> Any:
    """The value ``enc`` stores: bytes, JSON data, or an instance of the class passed.

    ``types`` None (or ``raw``): a model comes back as plain data.

    Raises:
        KeyError: a model whose tag no class in ``types`` has (the caller words it).
        ValueError: the bytes are not a valid value (msgspec's or pydantic's words).
    """
    if enc.kind == "bytes":
        return enc.data
    if enc.kind == "json" or raw or types is None:
        try:
            return _DECODER.decode(enc.data)
        except msgspec.DecodeError as exc:
            raise ValueError(str(exc)) from None
    codec = types.by_tag[enc.tag or ""]
    try:
        return codec.build(msgspec.json.decode(enc.data, type=codec.mirror))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # pydantic's ValidationError, a dataclass's own check
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def state_entry_types(classes: tuple[type, ...]) -> EntryTypes:
    """The types ``load_checkpoint(state_types=...)`` names, checked once."""
    return entry_types(classes)
