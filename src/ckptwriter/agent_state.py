"""Agent state: named values, each encoded once, when it is set.

:class:`AgentState` is a mutable mapping of plain names to values (JSON data, bytes, a
frozen pydantic model, msgspec Struct or dataclass). Setting a key encodes its value at
once (:mod:`ckptwriter.state_codec`) and gives it a new version; a snapshot captures the
whole state in O(number of keys) as references to those immutable bytes and versions,
and a checkpoint writes only the keys whose version changed since the previous one (an
unchanged key's file is hard-linked, or copied server-side, from the previous checkpoint).

Values are captured when set: changing a value in place after setting it is not seen
until the key is set again.

Versions are unique per state object and per process: each AgentState (and each copy of
one: ``copy.copy``, ``copy.deepcopy``, a pickle round trip) draws a fresh random id, and a
process forked from this one draws a fresh process id, so two states never give one
version to two different values (the writer links the previous file on a version match).
"""

from __future__ import annotations

import copy
import itertools
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from .layout import STREAM_NAME_RE, STREAM_NAME_RULE, state_file_name
from .state_codec import EncodedValue, encode_value

__all__ = ["AgentState", "StateItem", "check_name"]

# This process's part of every version: drawn again in a forked child, whose states are
# copies of the parent's (same ids, same counters) but whose sets are its own.
_PROCESS_ID = uuid.uuid4().hex[:8]


def _new_process_id() -> None:
    global _PROCESS_ID
    _PROCESS_ID = uuid.uuid4().hex[:8]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_process_id)


def check_name(name: object, what: str) -> str:
    """``name`` if it is a valid state key or log name.

    Raises:
        ValueError: it is not (the rule is named).
    """
    if not isinstance(name, str) or STREAM_NAME_RE.match(name) is None:
        raise ValueError(f"{what} {name!r} is not a valid name: use {STREAM_NAME_RULE}")
    return name


@dataclass(frozen=True, slots=True)
class StateItem:
    """One key of captured state: its file, its version, its encoded value.

    ``value.data`` is empty in the writer process for a key whose bytes were not sent
    (``sent`` False): that process has the file of this version already.
    """

    file: str
    version: str
    value: EncodedValue
    sent: bool = True


@dataclass(frozen=True, slots=True)
class _Slot:
    obj: Any
    item: StateItem


class AgentState(MutableMapping[str, Any]):
    """A mapping of plain names to values, each encoded once, when it is set.

    Args:
        data: keys and values to start with (a mapping or pairs).

    Raises:
        ValueError: a key is not a valid name, or a value holds a NaN or infinity.
        TypeError: a value would not load back equal (a tuple, a set, a dict with
            non-str keys, an object JSON cannot hold, an unfrozen model...).
    """

    __slots__ = ("_counter", "_id", "_slots")

    def __init__(self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
                 /, **kwargs: Any) -> None:
        self._slots: dict[str, _Slot] = {}
        self._id = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)
        self.update(data, **kwargs)

    # A copy is a state of its own: a fresh id (so fresh versions) and its own slots.
    # The encoded bytes are immutable and shared; each key gets a new version.

    def _copied(self, objs: Iterable[tuple[str, Any, EncodedValue]]) -> AgentState:
        new = type(self).__new__(type(self))
        AgentState.__init__(new)
        for key, obj, enc in objs:
            new._put(key, obj, enc)
        return new

    def __copy__(self) -> AgentState:
        return self._copied((k, s.obj, s.item.value) for k, s in self._slots.items())

    def __deepcopy__(self, memo: dict[int, Any]) -> AgentState:
        return self._copied((k, copy.deepcopy(s.obj, memo), s.item.value)
                            for k, s in self._slots.items())

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its values: unpickling builds a new state (fresh id and versions).
        return (_unpickled, ([(k, s.obj, s.item.value) for k, s in self._slots.items()],))

    def __setitem__(self, key: str, value: Any) -> None:
        check_name(key, "AgentState key")
        self._put(key, value, encode_value(key, value))

    def _put(self, key: str, obj: Any, enc: EncodedValue) -> None:
        version = f"{_PROCESS_ID}.{self._id}.{next(self._counter)}"
        self._slots[key] = _Slot(obj, StateItem(state_file_name(key, enc.kind), version, enc))

    def __getitem__(self, key: str) -> Any:
        return self._slots[key].obj

    def __delitem__(self, key: str) -> None:
        del self._slots[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __repr__(self) -> str:
        return f"AgentState({{{', '.join(f'{k!r}: {s.obj!r}' for k, s in self._slots.items())}}})"

    def encoded(self, key: str) -> bytes:
        """The bytes a checkpoint stores for ``key`` (encoded when it was set)."""
        return self._slots[key].item.value.data

    def capture(self) -> dict[str, StateItem]:
        """Every key's file, version and encoded bytes: O(number of keys), no encoding."""
        return {k: s.item for k, s in self._slots.items()}

    @classmethod
    def _restored(cls, values: Iterable[tuple[str, Any, EncodedValue]]) -> AgentState:
        """A state read back from a checkpoint: the stored bytes are kept as they are."""
        state = cls()
        for key, obj, enc in values:
            state._put(key, obj, enc)
        return state


def _unpickled(values: list[tuple[str, Any, EncodedValue]]) -> AgentState:
    return AgentState._restored(values)
