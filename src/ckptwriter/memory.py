"""The agent's memory: an append-only log of immutable, typed entries.

Entries are encoded to JSON Lines once, when they are appended, into immutable byte
chunks. That is what makes a snapshot O(1) (a chunk count and a byte length) and lets
the writer persist only what was appended since its previous checkpoint, without any
per-entry Python work off the training loop (the writer process sees only bytes).

Entry types are the four built-ins (:mod:`ckptwriter.entries`) and the caller's own,
passed as ``entry_types=`` (:mod:`ckptwriter.entry_codec`). ``append`` writes only what
loads back equal; a log read back from a file builds its entries when they are read
(:mod:`ckptwriter.memory_file`).
"""

from __future__ import annotations

import bisect
import mmap
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from .entries import (
    FEEDBACK_PREFIX,
    TEXT_PREFIXES,
    Action,
    AnyEntry,
    Feedback,
    FeedbackContent,
    MemoryEntry,
    Observation,
    Reflection,
    builtin_dicts,
)
from .entry_codec import FIELDS_ENCODER
from .entry_codec import entry_types as entry_types_of
from .memory_file import StoredEntries
from .nonfinite import find_unencodable_text

__all__ = [
    "Action",
    "AnyEntry",
    "Feedback",
    "FeedbackContent",
    "MemoryCapture",
    "MemoryEntry",
    "MemoryLog",
    "NeedFullMemory",
    "Observation",
    "Reflection",
]

# A sealed chunk is immutable `bytes`, safe for the writer thread to read while the
# loop keeps appending. Sealing copies the open tail, so the tail is kept small.
_SEAL_BYTES = 64 * 1024
# Entries encoded per msgspec call in extend(): amortizes the call, keeps the tail small.
_BATCH = 256
_encode_into = FIELDS_ENCODER.encode_into
_encode_lines = FIELDS_ENCODER.encode_lines
_TEXT_PREFIXES = TEXT_PREFIXES
_FEEDBACK_PREFIX = FEEDBACK_PREFIX
_RAW_READ_ONLY = ("this MemoryLog was loaded with raw=True (plain dicts) and cannot be "
                  "appended to; load it with entry_types=[...] to go on appending")


class NeedFullMemory(Exception):
    """A capture that holds only a delta was asked for bytes before it.

    The writer process raises it when the previous memory file cannot be extended after
    all; the loop then sends the whole memory.
    """


@dataclass(frozen=True, slots=True)
class MemoryCapture:
    """An O(1) view of a :class:`MemoryLog` at one moment.

    Holds a reference to the log's sealed chunks (append-only, never mutated) and how
    many of them, entries and bytes belong to the capture.
    """

    log_id: str
    entries: int
    nbytes: int
    # bytes in the loop; the writer process may map a large delta from a file instead.
    chunks: Sequence[bytes | mmap.mmap]
    chunk_ends: Sequence[int]
    n_chunks: int
    # Offset of the first chunk: a capture received by the writer process holds only the
    # bytes after what that process already committed.
    base: int = 0
    # Set in the writer process while the parent is still handing the bytes over: blocks
    # until every byte before the given offset has arrived.
    arrived: Callable[[int], None] | None = None
    # Or, reading them from the parent's memory (no chunks): the bytes from an offset on.
    pulled: Callable[[int], Sequence[memoryview]] | None = None

    def views(self, start: int = 0) -> Sequence[memoryview]:
        """The bytes from ``start`` on, as :meth:`iter_bytes` yields them; while they
        are still arriving, a sequence that waits for each view as it is read."""
        if self.pulled is not None:
            if start < self.base:
                raise NeedFullMemory(f"capture holds bytes from {self.base} on, not {start}")
            return self.pulled(min(start, self.nbytes))
        views = list(self.iter_bytes(start))
        if self.arrived is None:
            return views
        first = bisect.bisect_right(self.chunk_ends, start, 0, self.n_chunks)
        return _Arriving(views, self.chunk_ends[first:self.n_chunks], self.arrived)

    def iter_bytes(self, start: int = 0) -> Iterator[memoryview]:
        """Yield the encoded bytes of the capture from byte offset ``start`` on."""
        if self.pulled is not None:
            yield from self.views(start)
            return
        if start >= self.nbytes:
            return
        if start < self.base:
            raise NeedFullMemory(f"capture holds bytes from {self.base} on, not from {start}")
        i = bisect.bisect_right(self.chunk_ends, start, 0, self.n_chunks)
        chunk_start = self.chunk_ends[i - 1] if i else self.base
        view = memoryview(self.chunks[i])[start - chunk_start :]
        yield view
        for j in range(i + 1, self.n_chunks):
            yield memoryview(self.chunks[j])


class _Arriving(Sequence[memoryview]):
    """Views of bytes the parent is still writing: each one is handed out only once it
    has arrived, whoever reads it (the writer thread, the hashing thread, a join), so
    the write starts with the first slice instead of after the last."""

    __slots__ = ("_arrived", "_ends", "_views")

    def __init__(self, views: list[memoryview], ends: Sequence[int],
                 arrived: Callable[[int], None]) -> None:
        self._views, self._ends, self._arrived = views, ends, arrived

    def __len__(self) -> int:
        return len(self._views)

    @property
    def nbytes(self) -> int:
        """Their total size, known before any has arrived."""
        return sum(len(v) for v in self._views)

    @overload
    def __getitem__(self, i: int) -> memoryview: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[memoryview]: ...
    def __getitem__(self, i: int | slice) -> memoryview | Sequence[memoryview]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        k = i + len(self) if i < 0 else i
        view = self._views[k]  # IndexError as a list's
        self._arrived(self._ends[k])
        return view

    def __iter__(self) -> Iterator[memoryview]:
        for view, end in zip(self._views, self._ends, strict=True):
            self._arrived(end)
            yield view


class MemoryLog:
    """Append-only log of immutable memory entries, encoded as JSON Lines on append.

    Args:
        entries: entries to start with.
        entry_types: the caller's own entry types besides the four built-ins: frozen
            pydantic models, msgspec Structs or dataclasses. Each line's first key is
            the entry's ``type`` tag: its ``type`` field's Literal, else its class name.
        memory_type: a label stored in ``agent.json`` and checked on resume.

    Raises:
        TypeError: an entry type cannot be stored faithfully (the message says why).
    """

    __slots__ = ("_chunk_ends", "_chunks", "_entries", "_log_id", "_stored", "_tail",
                 "_types", "memory_type")

    def __init__(
        self,
        entries: Iterable[Any] = (),
        *,
        entry_types: Iterable[type] = (),
        memory_type: str = "history",
    ) -> None:
        self.memory_type = memory_type
        self._types = entry_types_of(entry_types)
        self._log_id = uuid.uuid4().hex
        self._stored: StoredEntries | None = None
        self._entries: list[Any] = []
        self._chunks: list[bytes] = []
        self._chunk_ends: list[int] = []
        self._tail = bytearray()
        self.extend(entries)

    @property
    def log_id(self) -> str:
        """Identity of this log; the writer only appends to files of the same log."""
        return self._log_id

    @property
    def entry_types(self) -> tuple[type, ...]:
        """The entry types passed besides the built-ins (empty for a raw log)."""
        return self._types.classes

    def append(self, entry: Any) -> None:
        """Append one entry (encoded now, once, so snapshots never re-encode it).

        Raises:
            TypeError: the entry's type is not registered (a subclass of a registered
                type included); the message says how to register it.
            ValueError: the entry would not load back equal: a NaN or infinity, or a
                value that skipped validation (the field and the problem are named).
        """
        tail = self._tail
        mark = len(tail)
        if mark >= _SEAL_BYTES:  # the previous append filled the tail
            self._seal()
            mark = 0
        try:
            # The fast path writes a built-in whose fields hold exactly what its model
            # validates (exact types); anything else takes the checked path, which names
            # the problem (model_copy and model_construct skip validation). Inlined, and
            # the line written as its fixed prefix and the encoded content: each call or
            # attribute of a pydantic model costs a few percent (benchmarks: target 5).
            try:
                d = entry.__dict__
                c = d["content"]
                if type(c) is str:
                    # KeyError for any type but the three text types, or a wrong tag.
                    prefix = _TEXT_PREFIXES[type(entry)][d["type"]] if len(d) == 2 else None
                elif type(c) is FeedbackContent and type(entry) is Feedback \
                        and d["type"] == "Feedback" and len(d) == 2:
                    c = c.__dict__
                    s = c["score"]
                    # s - s is 0.0 for a finite float, NaN for NaN and both infinities.
                    prefix = _FEEDBACK_PREFIX if type(s) is float and s - s == 0.0 \
                        and type(c["message"]) is str and len(c) == 2 else None
                else:
                    prefix = None
            except Exception:  # no __dict__, a missing field, an unhashable tag
                prefix = None
            if prefix is not None:
                tail += prefix
                _encode_into(c, tail, -1)
                tail += b"}\n"
            else:
                self._types.encode_checked(entry, tail)
                tail += b"\n"
        except BaseException as exc:
            # A failed encode can leave a partial line behind; it would corrupt every
            # later memory file. The log stays as it was.
            del tail[mark:]
            if isinstance(exc, UnicodeEncodeError):
                # Still a UnicodeEncodeError (a ValueError), now naming the field and fix.
                raise UnicodeEncodeError(exc.encoding, exc.object, exc.start, exc.end,
                                         _surrogate_problem(entry, exc)) from None
            raise
        self._entries.append(entry)

    def extend(self, entries: Iterable[Any]) -> None:
        """Append entries in order (built-ins are checked and encoded in batches: faster).

        All or nothing: if one entry is refused, none is appended (a retry would
        otherwise append the earlier ones twice).

        Raises:
            TypeError, ValueError: as :meth:`append`, for the first entry refused.
        """
        batch = entries if isinstance(entries, list) else list(entries)
        mark, n_chunks, n_entries = len(self._tail), len(self._chunks), len(self._entries)
        try:
            self._extend(batch)
        except BaseException:
            # Sealing moved the tail as it was into the first new chunk: take it back.
            if len(self._chunks) > n_chunks:
                self._tail[:] = self._chunks[n_chunks][:mark]
                del self._chunks[n_chunks:], self._chunk_ends[n_chunks:]
            del self._tail[mark:], self._entries[n_entries:]
            raise

    def _extend(self, batch: list[Any]) -> None:
        for i in range(0, len(batch), _BATCH):
            part = batch[i : i + _BATCH]
            dicts = builtin_dicts(part)
            try:
                lines = None if dicts is None else _encode_lines(dicts)
            except Exception:  # e.g. a lone surrogate: append names the entry
                lines = None
            if lines is None:
                for e in part:
                    self.append(e)
                continue
            self._tail += lines
            self._entries.extend(part)
            if len(self._tail) >= _SEAL_BYTES:
                self._seal()

    def _seal(self) -> None:
        if self._tail:
            end = (self._chunk_ends[-1] if self._chunk_ends else 0) + len(self._tail)
            self._chunks.append(bytes(self._tail))
            self._chunk_ends.append(end)
            self._tail.clear()

    def capture(self) -> MemoryCapture:
        """Return an O(1) capture of the log as it is now (copies about 64 KiB at most)."""
        self._seal()
        n = len(self._chunks)
        return MemoryCapture(
            log_id=self._log_id,
            entries=len(self),
            nbytes=self._chunk_ends[-1] if n else 0,
            chunks=self._chunks,
            chunk_ends=self._chunk_ends,
            n_chunks=n,
        )

    @property
    def nbytes(self) -> int:
        """Size of the log encoded as JSON Lines."""
        return (self._chunk_ends[-1] if self._chunk_ends else 0) + len(self._tail)

    def to_jsonl(self) -> bytes:
        """The log encoded as JSON Lines, exactly as a checkpoint stores it."""
        return b"".join(self._chunks) + bytes(self._tail)

    @classmethod
    def from_jsonl(
        cls,
        data: bytes,
        *,
        memory_type: str = "history",
        entry_types: Iterable[type] = (),
        raw: bool = False,
        source: str = "the memory file",
    ) -> MemoryLog:
        """Rebuild a log from JSON Lines, keeping the bytes exactly as they were.

        Every line is checked now; entry objects are built when they are read.

        Args:
            data: the JSON Lines.
            memory_type: the log's label.
            entry_types: the caller's own entry types (as for the constructor).
            raw: entries are plain dicts, whatever their type; the log is read-only.
            source: what to call ``data`` in errors (a checkpoint names itself).

        Raises:
            ValueError: a line is not a valid memory entry (the message names it).
            UnknownEntryTypeError: lines hold tags of no type passed (names them).
            TypeError: an entry type cannot be stored faithfully.
        """
        log = (_RawMemoryLog if raw else cls)(memory_type=memory_type, entry_types=entry_types)
        if data and not data.endswith(b"\n"):
            raise ValueError("memory file does not end with a newline (truncated?)")
        data = bytes(data)
        log._stored = StoredEntries(data, None if raw else log._types, source)
        if data:
            log._chunks.append(data)
            log._chunk_ends.append(len(data))
        return log

    def __len__(self) -> int:
        stored = self._stored
        return len(self._entries) + (len(stored) if stored is not None else 0)

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        stored = self._stored
        if stored is None:
            return self._entries[i]
        n = len(stored)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(start, stop, step)]
            head = stored.span(start, min(stop, n)) if start < n else []
            return head + self._entries[max(0, start - n) : max(0, stop - n)]
        k = i + len(self) if i < 0 else i
        if not 0 <= k < len(self):
            raise IndexError("MemoryLog index out of range")
        return stored.get(k) if k < n else self._entries[k - n]

    def __iter__(self) -> Iterator[Any]:
        if self._stored is not None:
            yield from self._stored
        yield from self._entries

    def counts_by_type(self) -> dict[str, int]:
        """Number of entries of each type tag."""
        out = dict(self._stored.counts) if self._stored is not None else {}
        by_cls = self._types.by_cls
        for e in self._entries:
            tag = by_cls[type(e)].tag
            out[tag] = out.get(tag, 0) + 1
        return out

    def __repr__(self) -> str:
        return f"MemoryLog(entries={len(self)}, memory_type={self.memory_type!r})"


def _surrogate_problem(entry: Any, exc: UnicodeEncodeError) -> str:
    where = find_unencodable_text(entry)
    bad = exc.object[exc.start:exc.end] if isinstance(exc.object, str) else "?"
    return (f"{type(entry).__name__} entry{where or ''}: holds {bad!r}, a lone surrogate "
            "that UTF-8 (a JSON line) cannot hold; it usually comes from bytes decoded with "
            "errors='surrogateescape': decode them with errors='replace' (or keep them as "
            "base64 text) before appending")


class _RawMemoryLog(MemoryLog):
    """A log read with ``raw=True``: its entries are plain dicts; nothing can be appended."""

    __slots__ = ()

    def append(self, entry: Any) -> None:
        """Refused: a raw log is read-only."""
        raise TypeError(_RAW_READ_ONLY)

    def extend(self, entries: Iterable[Any]) -> None:
        """Refused once there are entries: a raw log is read-only."""
        if list(entries):
            raise TypeError(_RAW_READ_ONLY)
