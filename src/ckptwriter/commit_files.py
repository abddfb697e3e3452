"""What one commit writes and what it reuses from the previous checkpoint.

Two kinds of files, both carried from commit to commit by :class:`Carries`:

- *Streams*: the memory and each named log, append-only. When the previous commit's
  file of the same log is still reusable, only the bytes appended since are written;
  the backend copies the prefix (a kernel-side copy or reflink locally, a server-side
  copy remotely) and the sha256 state carried from that commit is extended. A stream
  with nothing appended reaches the new checkpoint whole, as a linked file.
- *Whole files*: state keys, ``agent.json``, extra files. A file whose state version is
  the one committed last, or whose bytes hash to the previous same-name file's sha256,
  is not written at all: the backend links it (a hard link locally, a server-side copy
  on object storage). A ``FileSpec`` with a reuse token and no data asks for that.

The backend says what it can reuse (:meth:`Backend.can_reuse`); nothing here knows
which backend it is.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .memory import MemoryCapture, NeedFullMemory
from .storage.base import Backend, FileSpec, ReuseToken

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["Carries", "Plan", "Stage", "WholeFile"]

# How the bytes of a stream written whole are handed to the backend: the views as they
# are, or the same bytes another way (a thread executor's large full write goes through
# page-aligned buffers, so that it can go past the page cache).
Stage = Callable[[Sequence[memoryview], int], Sequence[memoryview]]

# Above this size, hashing runs in another thread while this one writes and fsyncs:
# both release the GIL, so a full write costs what a raw write + fsync costs.
_PARALLEL_HASH_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class _StreamCarry:
    """A stream's file of the last commit, which the next one may extend."""

    log_id: str
    entries: int
    nbytes: int
    sha: _Hash
    token: ReuseToken


@dataclass(slots=True)
class _FileCarry:
    """A whole file of the last commit, which the next one may link."""

    nbytes: int
    sha256: str
    token: ReuseToken
    version: str | None


@dataclass(frozen=True, slots=True)
class WholeFile:
    """A whole file of a checkpoint; ``data`` None: not sent (the version must match)."""

    name: str
    data: bytes | None
    version: str | None = None


@dataclass(slots=True)
class _Stream:
    key: str
    name: str
    cap: MemoryCapture
    carry: _StreamCarry | None
    # Of bytes still arriving in the writer process, reading a view waits for it.
    views: Sequence[memoryview]
    sha: _Hash

    @property
    def new_bytes(self) -> int:
        """The bytes this commit writes (counted without waiting for any to arrive)."""
        return self.cap.nbytes - (self.carry.nbytes if self.carry is not None else 0)


@dataclass(slots=True)
class Plan:
    """The files of one commit: what is written, what is reused, and the digests."""

    first: FileSpec
    rest: list[FileSpec]
    # name -> (bytes, sha256) of every file, in the order they are listed.
    digests: dict[str, tuple[int, str]]
    streams: list[_Stream]
    versions: dict[str, str | None] = field(default_factory=dict)
    bytes_written: int = 0
    bytes_reused: int = 0
    files_linked: int = 0
    _hasher: threading.Thread | None = None

    @property
    def memory(self) -> _Stream:
        """The memory stream (always the first)."""
        return self.streams[0]

    def start_hashing(self) -> None:
        """Extend each stream's sha256 over its new bytes: in a thread when large.

        Bytes the writer process reads from the training process are hashed as the
        write reads them (``hash_along``), not read a second time.
        """
        own = []
        for s in self.streams:
            along = getattr(s.views, "hash_along", None)
            if along is not None:
                along(s.sha)
            else:
                own.append(s)
        jobs = [(s.sha, s.views) for s in own]
        if sum(s.new_bytes for s in own) >= _PARALLEL_HASH_BYTES:
            self._hasher = threading.Thread(target=_hash_all, args=(jobs,),
                                            name="ckptwriter-hash")
            self._hasher.start()
        else:
            _hash_all(jobs)

    def finish_hashing(self) -> None:
        """Wait for the hashing thread; every stream's digest is then in :attr:`digests`."""
        self._join(abandon=False)
        for s in self.streams:
            self.digests[s.name] = (s.cap.nbytes, s.sha.hexdigest())

    def abandon_hashing(self) -> None:
        """Stop hashing: the write failed, no digest is wanted."""
        self._join(abandon=True)

    def _join(self, *, abandon: bool) -> None:
        if self._hasher is not None:
            self._hasher.join()
            self._hasher = None
        for s in self.streams:
            end = getattr(s.views, "abandon_hash" if abandon else "finish_hash", None)
            if end is not None:
                end()


    def listing(self) -> dict[str, dict[str, object]]:
        """runtime.json's ``files``: every file in write order, with its size and sha256."""
        return {spec.name: {"bytes": self.digests[spec.name][0],
                            "sha256": self.digests[spec.name][1]}
                for spec in (self.first, *self.rest)}


def _hash_all(jobs: Sequence[tuple[_Hash, Sequence[memoryview]]]) -> None:
    for sha, views in jobs:
        for v in views:
            sha.update(v)


class Carries:
    """What the last commit wrote that the next one may reuse."""

    def __init__(self, stage: Stage | None = None) -> None:
        self.streams: dict[str, _StreamCarry] = {}
        self.files: dict[str, _FileCarry] = {}
        self._stage = stage

    def clear(self) -> None:
        """Forget everything: the next commit writes every file whole."""
        self.streams.clear()
        self.files.clear()

    def plan(self, b: Backend, streams: Sequence[tuple[str, str, MemoryCapture]],
             files: Sequence[WholeFile]) -> Plan:
        """The specs of one commit's files (``streams[0]`` is the memory).

        Raises:
            NeedFullMemory: a stream or file is needed whole but only part of it (or
                none of it: an unsent state value) is here.
        """
        planned = [self._stream(b, key, name, cap) for key, name, cap in streams]
        plan = Plan(FileSpec("", []), [], {}, planned)
        specs = []
        for s in planned:
            reuse = s.carry.token if s.carry is not None else None
            spec = FileSpec(s.name, s.views, reuse)
            specs.append(spec)
            start = s.carry.nbytes if s.carry is not None else 0
            plan.bytes_written += s.cap.nbytes - start
            plan.bytes_reused += start
            plan.files_linked += reuse is not None and not s.views
        for f in files:
            specs.append(self._whole(b, f, plan))
        plan.first, plan.rest = specs[0], specs[1:]
        return plan

    def _stream(self, b: Backend, key: str, name: str, cap: MemoryCapture) -> _Stream:
        carry = self.streams.get(key)
        if carry is not None and not (
                carry.log_id == cap.log_id and carry.nbytes <= cap.nbytes
                and b.can_reuse(carry.token, whole=carry.nbytes == cap.nbytes)):
            carry = None
        start = carry.nbytes if carry is not None else 0
        sha = carry.sha.copy() if carry is not None else hashlib.sha256()
        views = cap.views(start)
        if carry is None and self._stage is not None:
            views = self._stage(views, cap.nbytes)
        return _Stream(key, name, cap, carry, views, sha)

    def _whole(self, b: Backend, f: WholeFile, plan: Plan) -> FileSpec:
        prev = self.files.get(f.name)
        plan.versions[f.name] = f.version
        # A version names one value of one state object (ids are random per state, per
        # copy, per process); the size the bytes sent must have too is a cheap second
        # guard against linking another value's file under a colliding version.
        if prev is not None and f.version is not None and prev.version == f.version \
                and (f.data is None or len(f.data) == prev.nbytes) \
                and b.can_reuse(prev.token, whole=True):
            return self._linked(f.name, prev, plan)
        if f.data is None:
            raise NeedFullMemory(f"{f.name}: its bytes were not sent and cannot be reused")
        digest = hashlib.sha256(f.data).hexdigest()
        if prev is not None and prev.sha256 == digest and prev.nbytes == len(f.data) \
                and b.can_reuse(prev.token, whole=True):
            return self._linked(f.name, prev, plan)
        plan.digests[f.name] = (len(f.data), digest)
        plan.bytes_written += len(f.data)
        return FileSpec(f.name, [f.data])

    @staticmethod
    def _linked(name: str, prev: _FileCarry, plan: Plan) -> FileSpec:
        plan.digests[name] = (prev.nbytes, prev.sha256)
        plan.bytes_reused += prev.nbytes
        plan.files_linked += 1
        return FileSpec(name, [], prev.token)

    def remember(self, plan: Plan, tokens: dict[str, ReuseToken]) -> None:
        """After a successful commit: its files are what the next one may reuse."""
        self.streams = {
            s.key: _StreamCarry(s.cap.log_id, s.cap.entries, s.cap.nbytes, s.sha, tokens[s.name])
            for s in plan.streams
        }
        stream_names = {s.name for s in plan.streams}
        self.files = {
            name: _FileCarry(n, sha, tokens[name], plan.versions.get(name))
            for name, (n, sha) in plan.digests.items() if name not in stream_names
        }
