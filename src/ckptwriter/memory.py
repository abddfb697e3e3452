"""The agent's memory: an append-only log of immutable, typed entries.

Entries are encoded to JSON Lines once, when they are appended, into immutable byte
chunks. That is what makes a snapshot O(1) (a chunk count and a byte length) and lets
the writer persist only what was appended since its previous checkpoint, without any
per-entry Python work off the training loop.
"""

from __future__ import annotations

import bisect
import mmap
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, TypeAlias, overload

import msgspec
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = [
    "Action",
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
_ENTRY_ADAPTER: TypeAdapter[AnyEntry] = TypeAdapter(MemoryEntry)
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def _builtin(entry: AnyEntry) -> dict[str, object]:
    # Hand-built dict: ~10x faster than model_dump on the append path, same bytes.
    if isinstance(entry, Feedback):
        c = entry.content
        return {"type": "Feedback", "content": {"score": c.score, "message": c.message}}
    return {"type": entry.type, "content": entry.content}


def _fields(obj: object) -> dict[str, object]:
    # msgspec calls this for a nested model (Feedback's content): its field values.
    if isinstance(obj, _Entry):
        return obj.__dict__
    raise NotImplementedError(f"cannot encode {type(obj).__name__} in a memory entry")


# A pydantic model's __dict__ holds exactly its field values, in declaration order
# ("type" first), so encoding it gives _builtin's bytes without building a dict:
# about 2x the entries per second on the append path (benchmarks: target 5).
_FIELDS_ENCODER = msgspec.json.Encoder(enc_hook=_fields)
_EXACT_TYPES = frozenset({Observation, Action, Feedback, Reflection})


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

    def iter_bytes(self, start: int = 0) -> Iterator[memoryview]:
        """Yield the encoded bytes of the capture from byte offset ``start`` on."""
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


class MemoryLog:
    """Append-only log of immutable memory entries, encoded as JSON Lines on append.

    Args:
        entries: entries to start with.
        memory_type: a label stored in ``agent.json`` and checked on resume.
    """

    __slots__ = ("_chunk_ends", "_chunks", "_entries", "_log_id", "_tail", "memory_type")

    def __init__(
        self,
        entries: Iterable[AnyEntry] = (),
        *,
        memory_type: str = "history",
    ) -> None:
        self.memory_type = memory_type
        self._log_id = uuid.uuid4().hex
        self._entries: list[AnyEntry] = []
        self._chunks: list[bytes] = []
        self._chunk_ends: list[int] = []
        self._tail = bytearray()
        self.extend(entries)

    @property
    def log_id(self) -> str:
        """Identity of this log; the writer only appends to files of the same log."""
        return self._log_id

    def append(self, entry: AnyEntry) -> None:
        """Append one entry (encoded now, once, so snapshots never re-encode it)."""
        tail = self._tail
        mark = len(tail)
        try:
            if type(entry) in _EXACT_TYPES:
                _FIELDS_ENCODER.encode_into(entry.__dict__, tail, -1)
            elif isinstance(entry, (Observation, Action, Feedback, Reflection)):
                # A subclass may carry more fields; the file holds the base fields only.
                _ENCODER.encode_into(_builtin(entry), tail, -1)
            else:
                raise TypeError(
                    f"MemoryLog entries must be Observation, Action, Feedback or Reflection, "
                    f"got {type(entry).__name__}"
                )
        except BaseException:
            # A failed encode can leave a partial line (even stale buffer bytes) behind;
            # they would corrupt every later memory file. The log stays as it was.
            del tail[mark:]
            raise
        tail += b"\n"
        self._entries.append(entry)
        if len(tail) >= _SEAL_BYTES:
            self._seal()

    def extend(self, entries: Iterable[AnyEntry]) -> None:
        """Append entries in order (encoded in batches: faster than one by one)."""
        batch = entries if isinstance(entries, list) else list(entries)
        exact = _EXACT_TYPES
        for i in range(0, len(batch), _BATCH):
            part = batch[i : i + _BATCH]
            if all(type(e) in exact for e in part):
                self._tail += _FIELDS_ENCODER.encode_lines([e.__dict__ for e in part])
                self._entries.extend(part)
                if len(self._tail) >= _SEAL_BYTES:
                    self._seal()
            else:
                for e in part:
                    self.append(e)

    def _seal(self) -> None:
        if self._tail:
            end = (self._chunk_ends[-1] if self._chunk_ends else 0) + len(self._tail)
            self._chunks.append(bytes(self._tail))
            self._chunk_ends.append(end)
            self._tail.clear()

    def capture(self) -> MemoryCapture:
        """Return an O(1) capture of the log as it is now (copies at most 64 KiB)."""
        self._seal()
        n = len(self._chunks)
        return MemoryCapture(
            log_id=self._log_id,
            entries=len(self._entries),
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
    def from_jsonl(cls, data: bytes, *, memory_type: str = "history") -> MemoryLog:
        """Rebuild a log from JSON Lines, keeping the bytes exactly as they were.

        Raises:
            ValueError: a line is not a valid memory entry (the message names it).
        """
        log = cls(memory_type=memory_type)
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        else:
            raise ValueError("memory file does not end with a newline (truncated?)")
        entries = log._entries
        for no, line in enumerate(lines, 1):
            try:
                entries.append(_ENTRY_ADAPTER.validate_python(_DECODER.decode(line)))
            except (msgspec.DecodeError, ValidationError) as exc:
                first = str(exc).splitlines()[0]
                raise ValueError(f"line {no} is not a valid memory entry: {first}") from exc
            except RecursionError as exc:
                # msgspec's depth limit (an entry nests two levels): a hostile or damaged
                # line, not a bug, so it is named like any other invalid line.
                raise ValueError(
                    f"line {no} is not a valid memory entry: JSON nested too deeply ({exc})"
                ) from exc
        if data:
            log._chunks.append(bytes(data))
            log._chunk_ends.append(len(data))
        return log

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, i: int) -> AnyEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[AnyEntry]: ...
    def __getitem__(
        self, i: int | slice
    ) -> AnyEntry | list[AnyEntry]:
        return self._entries[i]

    def __iter__(self) -> Iterator[AnyEntry]:
        return iter(self._entries)

    def counts_by_type(self) -> dict[str, int]:
        """Number of entries of each type."""
        out: dict[str, int] = {}
        for e in self._entries:
            out[e.type] = out.get(e.type, 0) + 1
        return out

    def __repr__(self) -> str:
        return f"MemoryLog(entries={len(self)}, memory_type={self.memory_type!r})"
