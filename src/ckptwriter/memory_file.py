"""A memory file read back: checked whole when loaded, each entry built when it is read.

Loading checks every line against the mirrors of the registered entry types with msgspec,
a batch of lines per call (in C, about the cost of decoding the file into structs), and
keeps only the file's bytes, which the log holds anyway to extend them byte for byte.
An entry object (a pydantic model, say) is built when the entry is read, a batch at a
time: a million of them take several times the file's size in memory, for a resumed
agent that mostly appends. Built-in entries are built from the decoded lines without
validating them again (they were checked against mirrors that refuse every line the
models refuse: tests/test_loading_fast.py), a few C passes per batch; a file of
built-ins only is decoded for that as plain JSON, the cheapest decode. A user's pydantic
entries are validated by pydantic, a batch of msgspec-decoded values per call.
"""

from __future__ import annotations

import bisect
import gc
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import msgspec
from pydantic import ValidationError

from .entries import BUILTIN_MIRROR_TYPES, build_builtins, build_plain_builtins
from .entry_codec import EntryTypes, RawTag, plain_lines
from .errors import UnknownEntryTypeError

__all__ = ["StoredEntries"]

# Bytes of lines per decode call: large enough to amortize the call, small enough that
# a batch of built entries stays small (and one read builds little more than it needs).
_BATCH_BYTES = 64 * 1024
_RAW = msgspec.json.Decoder(RawTag)
_DECODE_ERRORS = (msgspec.DecodeError, RecursionError)


class _NotAnEntry(ValueError):
    """A raw line that is not an object with a string ``type``."""


def _raw_tag(entry: Any) -> str:
    if type(entry) is not dict or type(tag := entry.get("type")) is not str:
        raise _NotAnEntry("Expected an object with a string `type`")
    return tag


def _raw_line(line: bytes) -> str:
    return _raw_tag(plain_lines(line)[0])


def _groups(kinds: set[type]) -> list[frozenset[type]]:
    """The mirror kinds of a batch, grouped as they are built: the built-ins together."""
    builtin = frozenset(kinds & BUILTIN_MIRROR_TYPES)
    return ([builtin] if builtin else []) + [frozenset({k}) for k in kinds - builtin]


def _builtins(chunk: memoryview) -> list[Any]:
    return build_plain_builtins(plain_lines(chunk))


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Building many acyclic objects at once triggers collections that walk every object
    # alive, again and again (most of the time of a large load); none can be garbage.
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class StoredEntries:
    """The entries of one memory file, checked, built from its bytes when read.

    Args:
        data: the file's bytes (kept, not copied).
        types: the registered entry types, or None for raw mode (plain dicts).
        source: what to call the file in errors.

    Raises:
        ValueError: a line is not a valid entry of a registered type (names the line).
        UnknownEntryTypeError: lines hold tags of no registered type (names them).
    """

    __slots__ = ("_build", "_cache", "_counts", "_data", "_firsts", "_starts", "_types",
                 "source")

    def __init__(self, data: bytes, types: EntryTypes | None, source: str) -> None:
        self._data, self._types, self.source = data, types, source
        self._starts, self._firsts = [0], [0]
        counted: Counter[Any] = Counter()  # raw: tags (counted now, as cheap as any)
        kinds: set[Any] = set()  # typed: the mirror classes (counted when asked)
        view, size, pos, n = memoryview(data), len(data), 0, 0
        # Paused: a batch's mirrors die by reference count; a collection would only walk
        # them (and everything else alive) again and again.
        with _gc_paused():
            while pos < size:
                end = data.find(b"\n", min(pos + _BATCH_BYTES, size) - 1)
                end = size if end < 0 else end + 1
                try:
                    if types is None:
                        # Decoded whole, as it will be read: a line nested too deeply fails now.
                        items = plain_lines(view[pos:end])
                        counted.update(_raw_tag(d) for d in items)
                    else:
                        items = types.decoder.decode_lines(view[pos:end])
                        kinds.update(map(type, items))
                except (*_DECODE_ERRORS, _NotAnEntry):
                    raise self._problem(pos, end) from None
                n += len(items)
                pos = end
                self._starts.append(end)
                self._firsts.append(n)
        self._counts: dict[str, int] | None = dict(counted) if types is None else None
        self._build: Callable[[memoryview], list[Any]] = (
            plain_lines if types is None
            # Only built-ins (checked just now): plain JSON, built in a few C passes.
            else _builtins if BUILTIN_MIRROR_TYPES.issuperset(kinds) else self._typed)
        self._cache: tuple[int, list[Any]] = (-1, [])

    @property
    def counts(self) -> dict[str, int]:
        """Entries of each tag (decoded again when first asked: only inspection asks)."""
        if self._counts is None:
            assert self._types is not None
            decode, tag_of = self._types.decoder.decode_lines, self._types.tag_of_mirror
            counted: Counter[Any] = Counter()
            view = memoryview(self._data)
            with _gc_paused():
                for a, b in pairwise(self._starts):
                    counted.update(map(type, decode(view[a:b])))
            self._counts = {tag_of[m]: k for m, k in counted.items()}
        return self._counts

    def _problem(self, pos: int, end: int) -> Exception:
        decoder = self._types.decoder.decode if self._types is not None else _raw_line
        first = self._data.count(b"\n", 0, pos) + 1
        for no, line in enumerate(self._data[pos:end].split(b"\n"), first):
            if not line.strip():
                continue
            try:
                decoder(line)
            except RecursionError as exc:
                return ValueError(
                    f"line {no} is not a valid memory entry: JSON nested too deeply ({exc})")
            except (msgspec.DecodeError, _NotAnEntry) as exc:
                unknown = self._unknown_tags()
                if unknown and self._types is not None:
                    return UnknownEntryTypeError(self.source, unknown, self._types.tags)
                return ValueError(f"line {no} is not a valid memory entry: {exc}")
        return ValueError("memory file is not valid JSON Lines")

    def _unknown_tags(self) -> dict[str, int]:
        """Tags of the file that no registered type has, with the first line of each."""
        known = self._types.by_tag if self._types is not None else {}
        found: dict[str, int] = {}
        for no, line in enumerate(self._data.split(b"\n"), 1):
            try:
                tag = _RAW.decode(line).type
            except _DECODE_ERRORS:
                continue
            if tag not in known:
                found.setdefault(tag, no)
        return found

    def _typed(self, chunk: memoryview) -> list[Any]:
        assert self._types is not None
        items = self._types.decoder.decode_lines(chunk)
        try:
            kinds = set(map(type, items))
            if not kinds:  # a batch of blank lines
                return []
            if len(kinds) == 1 or BUILTIN_MIRROR_TYPES.issuperset(kinds):
                return self._build_kind(kinds.pop(), items)
            # Mixed: each kind built in one call, the entries put back in file order.
            out: list[Any] = [None] * len(items)
            for group in _groups(kinds):
                positions = [i for i, m in enumerate(items) if type(m) in group]
                built = self._build_kind(next(iter(group)), [items[i] for i in positions])
                for i, entry in zip(positions, built, strict=True):
                    out[i] = entry
            return out
        except (ValidationError, TypeError, ValueError) as exc:
            # Checked on load, so only a class changed since the file was written fails.
            raise ValueError(
                f"{self.source}: an entry no longer fits its class (changed since the "
                f"checkpoint was written?): {str(exc).splitlines()[0]}"
            ) from exc

    def _build_kind(self, kind: type, items: list[Any]) -> list[Any]:
        """Entries of ``items``: mirrors of ``kind``, or of built-in kinds only."""
        assert self._types is not None
        if kind in BUILTIN_MIRROR_TYPES:
            return build_builtins(items)  # all at once: a few C passes
        many = self._types.build_many.get(kind)
        if many is not None:
            return many(items)
        build = self._types.build[kind]
        return [build(m) for m in items]

    def __len__(self) -> int:
        return self._firsts[-1]

    def _batch(self, b: int) -> list[Any]:
        if self._cache[0] == b:
            return self._cache[1]
        with _gc_paused():
            entries = self._build(memoryview(self._data)[self._starts[b] : self._starts[b + 1]])
        self._cache = (b, entries)
        return entries

    def get(self, i: int) -> Any:
        """Entry ``i`` (0 <= i < len)."""
        b = bisect.bisect_right(self._firsts, i) - 1
        return self._batch(b)[i - self._firsts[b]]

    def span(self, start: int, stop: int) -> list[Any]:
        """Entries ``start`` to ``stop`` (0 <= start <= stop <= len), built in batches."""
        if start >= stop:
            return []
        out: list[Any] = []
        first = bisect.bisect_right(self._firsts, start) - 1
        with _gc_paused():
            for b in range(first, len(self._starts) - 1):
                lo = self._firsts[b]
                if lo >= stop:
                    break
                out += self._batch(b)[max(0, start - lo) : stop - lo]
        return out

    def __iter__(self) -> Iterator[Any]:
        for b in range(len(self._starts) - 1):
            yield from self._batch(b)
