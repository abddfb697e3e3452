"""The four built-in memory entry types of the guide, and how each is checked and read.

Every entry is one JSON line whose first key is its ``type`` tag. Besides the pydantic
models users build, each built-in type has a msgspec mirror: what a memory file is
checked against when it is loaded (in C, without building a model per line).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable
from itertools import repeat
from operator import itemgetter
from typing import Annotated, Any, Literal, TypeAlias

import msgspec
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BUILTIN_MIRRORS",
    "BUILTIN_MIRROR_TYPES",
    "BUILTIN_TYPES",
    "FEEDBACK_PREFIX",
    "TEXT_PREFIXES",
    "TEXT_TAGS",
    "Action",
    "AnyEntry",
    "Feedback",
    "FeedbackContent",
    "MemoryEntry",
    "Observation",
    "Reflection",
    "build_builtins",
    "build_plain_builtins",
    "builtin_dicts",
]


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Observation(_Entry):
    """What the environment showed the agent."""

    type: Literal["Observation"] = "Observation"
    content: str


class Action(_Entry):
    """What the agent did."""

    type: Literal["Action"] = "Action"
    content: str


class FeedbackContent(_Entry):
    """The environment's verdict on an action."""

    # NaN/inf would be written as null and refused on load, making every later checkpoint
    # of the append-only log unloadable: refuse them at the source.
    score: float = Field(allow_inf_nan=False)
    message: str


class Feedback(_Entry):
    """The environment's verdict, ``{"score": ..., "message": ...}``."""

    type: Literal["Feedback"] = "Feedback"
    content: FeedbackContent


class Reflection(_Entry):
    """A lesson the agent wrote for itself."""

    type: Literal["Reflection"] = "Reflection"
    content: str


MemoryEntry = Annotated[
    Observation | Action | Feedback | Reflection, Field(discriminator="type")
]
AnyEntry: TypeAlias = Observation | Action | Feedback | Reflection
BUILTIN_TYPES: tuple[type[BaseModel], ...] = (Observation, Action, Feedback, Reflection)
TEXT_TAGS: dict[type, str] = {
    Observation: "Observation", Action: "Action", Reflection: "Reflection"}
# What a line starts with before its content's JSON, by class and then by the tag its
# fields must hold: a retagged entry (model_copy(update={"type": ...})) is not found.
TEXT_PREFIXES: dict[type, dict[Any, bytes]] = {
    cls: {tag: b'{"type":"%s","content":' % tag.encode()} for cls, tag in TEXT_TAGS.items()}
FEEDBACK_PREFIX = b'{"type":"Feedback","content":'

# What a file's line must be (extra keys refused, as the models' extra="forbid" does).
# A finite float: 1e999 in a file would decode as inf, which Feedback refuses.
_Finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]


class _TextM(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    content: str


class _ObservationM(_TextM, frozen=True, tag="Observation"):
    pass


class _ActionM(_TextM, frozen=True, tag="Action"):
    pass


class _ReflectionM(_TextM, frozen=True, tag="Reflection"):
    pass


class _FeedbackContentM(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    score: _Finite
    message: str


class _FeedbackM(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type",
                 tag="Feedback"):
    content: _FeedbackContentM


class _FieldsSet(set[str]):
    """The ``model_fields_set`` that every entry read back from a file shares (one set
    per entry would be a third of their memory). Read-only, so sharing it is safe;
    copies (model_copy, copy, pickle) are plain sets."""

    def _shared(self, *args: Any) -> Any:
        raise TypeError("the fields set of an entry read back from a file is shared by "
                        "all such entries and cannot be changed; change a copy: "
                        "set(entry.model_fields_set)")

    add = discard = remove = pop = clear = update = _shared
    difference_update = intersection_update = symmetric_difference_update = _shared
    __ior__ = __iand__ = __isub__ = __ixor__ = _shared

    def __copy__(self) -> set[str]:
        return set(self)

    def __deepcopy__(self, memo: Any) -> set[str]:
        return set(self)

    def __reduce__(self) -> Any:
        return (set, (list(self),))


_TYPE_CONTENT = _FieldsSet(("type", "content"))
_SCORE_MESSAGE = _FieldsSet(("score", "message"))
# What a validated built-in holds besides its __dict__; set through pydantic's own slots.
_new = object.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
_drain = deque[None](maxlen=0).extend


def _construct(classes: Iterable[type], dicts: list[dict[str, Any]],
               fields_set: set[str]) -> list[Any]:
    """Models of ``classes`` holding ``dicts``: what validation builds, without validating.

    For data that was checked against the models' msgspec mirrors, which refuse every
    line the models refuse (tests/test_loading_fast.py), and hold what validation would
    give; what ``model_construct`` does, a map per slot (in C).
    """
    objs: list[Any] = list(map(_new, classes))
    _drain(map(_set_dict, objs, dicts))
    _drain(map(_set_fields, objs, repeat(fields_set)))
    _drain(map(_set_extra, objs, repeat(None)))
    _drain(map(_set_private, objs, repeat(None)))
    return objs


def build_builtins(mirrors: list[Any]) -> list[Any]:
    """The built-in entries that ``mirrors`` (decoded, checked lines) hold, in order."""
    dicts: list[dict[str, Any]] = msgspec.to_builtins(mirrors)  # "type" first, C speed
    kinds = set(map(type, mirrors))
    if _FeedbackM in kinds:
        fb = [d for d in dicts if d["type"] == "Feedback"]
        contents = _construct(repeat(FeedbackContent, len(fb)), [d["content"] for d in fb],
                              _SCORE_MESSAGE)
        for d, c in zip(fb, contents, strict=True):
            d["content"] = c
    return _construct(map(_CLASS_OF.__getitem__, map(type, mirrors)), dicts, _TYPE_CONTENT)


def build_plain_builtins(dicts: list[dict[str, Any]]) -> list[Any]:
    """The built-in entries that ``dicts`` (lines decoded as plain JSON) hold, in order.

    Only for lines already checked against the mirrors: each has exactly the keys of
    its type, of the right types. What :func:`build_builtins` builds from the mirrors,
    without a typed decode and a conversion per line: keys put in field order where a
    file has them in another, a whole-number score made a float (as the mirror does).
    """
    tags = list(map(_TAG, dicts))
    if list(map(next, map(iter, dicts))).count("type") != len(dicts):
        dicts = [d if next(iter(d)) == "type" else {"type": d["type"], "content": d["content"]}
                 for d in dicts]
    if "Feedback" in tags:
        fb = [d for d in dicts if d["type"] == "Feedback"]
        contents = _construct(repeat(FeedbackContent, len(fb)), [
            {"score": float(c["score"]), "message": c["message"]}
            for c in map(_CONTENT, fb)], _SCORE_MESSAGE)
        for d, c in zip(fb, contents, strict=True):
            d["content"] = c
    return _construct(map(_CLASS_OF_TAG.__getitem__, tags), dicts, _TYPE_CONTENT)


def _one(m: Any) -> Any:
    return build_builtins([m])[0]


_CLASS_OF: dict[type, type] = {_ObservationM: Observation, _ActionM: Action,
                               _FeedbackM: Feedback, _ReflectionM: Reflection}
BUILTIN_MIRROR_TYPES = frozenset(_CLASS_OF)
_CLASS_OF_TAG: dict[str, type] = {c.__name__: c for c in _CLASS_OF.values()}
_TAG = itemgetter("type")
_CONTENT = itemgetter("content")

# class -> (its mirror, mirror instance -> entry).
BUILTIN_MIRRORS: dict[type, tuple[type[msgspec.Struct], Any]] = {
    Observation: (_ObservationM, _one),
    Action: (_ActionM, _one),
    Feedback: (_FeedbackM, _one),
    Reflection: (_ReflectionM, _one),
}


def builtin_dicts(entries: list[Any]) -> list[dict[str, Any]] | None:
    """What ``extend`` encodes for ``entries``, or None if one may not load back equal.

    None unless every entry is a built-in whose fields hold exactly what its model
    validates: ``model_copy(update=...)`` and ``model_construct`` skip validation, and
    what this does not vouch for takes the checked path of ``append``, which names the
    problem. A Feedback becomes a plain dict (its content's fields), so the encoder needs
    no Python call for it. Exact types only: a subclass is not the type it derives from.
    """
    tags = TEXT_TAGS
    out: list[dict[str, Any]] = []
    push = out.append
    try:
        for e in entries:
            d = e.__dict__
            c = d["content"]
            if type(c) is str:
                # KeyError for any type but the three text types: the checked path.
                if d["type"] != tags[type(e)] or len(d) != 2:
                    return None
                push(d)
            else:
                if type(c) is not FeedbackContent or type(e) is not Feedback \
                        or d["type"] != "Feedback" or len(d) != 2:
                    return None
                cd = c.__dict__
                s = cd["score"]
                # s - s is 0.0 for every finite float, NaN for NaN and both infinities.
                if type(s) is not float or s - s != 0.0 or type(cd["message"]) is not str \
                        or len(cd) != 2:
                    return None
                push({"type": "Feedback", "content": cd})
    except Exception:  # no __dict__, a missing field, a tag that cannot be compared
        return None
    return out
