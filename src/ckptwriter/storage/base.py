"""The contract every storage backend meets.

Methods are synchronous and blocking: the writer calls them from one worker thread,
one checkpoint at a time, batched so that a checkpoint costs one thread hop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from ..retention import CheckpointRecord
from ..snapshot import CapturedSnapshot

__all__ = ["CommitOutcome", "MemoryState", "Storage"]


@dataclass(slots=True)
class MemoryState:
    """The memory file of the last committed checkpoint, reused by the next one."""

    log_id: str
    entries: int
    nbytes: int
    location: str
    sha: hashlib._Hash
    # Identity of the file when it was committed: a file replaced or edited in place
    # since (same size, other bytes) must not be extended with the old hash state.
    ino: int = 0
    mtime_ns: int = 0


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """What one commit did."""

    name: str
    path: str
    bytes_written: int
    entries_serialized: int
    bytes_serialized: int
    incremental: bool
    serialize_seconds: float
    write_seconds: float
    memory: MemoryState
    record: CheckpointRecord
    latest_json: bytes


class Storage(Protocol):
    """Atomic checkpoint commit, pointer update and deletion for one checkpoints dir."""

    location: str

    def open(self) -> list[CheckpointRecord]:
        """Create the directory, take the writer lock, clean leftovers, list checkpoints."""
        ...

    def close(self) -> None:
        """Release the writer lock."""
        ...

    def commit(self, snap: CapturedSnapshot, prev: MemoryState | None) -> CommitOutcome:
        """Write a checkpoint so that it appears complete or not at all."""
        ...

    def set_latest(self, outcome: CommitOutcome) -> None:
        """Point ``latest`` at a committed checkpoint, atomically."""
        ...

    def delete(self, name: str) -> None:
        """Remove a checkpoint so that it disappears atomically."""
        ...
