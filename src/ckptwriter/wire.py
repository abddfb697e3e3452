"""The wire format between the training process and its writer process.

Each message is one length-prefixed msgpack frame of a msgspec Struct, encoded once and
decoded once. A commit request is followed on the pipe by ``payload`` bytes: the bytes
of each state value the writer process does not hold yet (``StateRef.sent``, in
``state`` order: first, since the child needs them whole before it writes), then the
memory appended since the writer process's previous commit, then each named log's
appended bytes (in ``logs`` order). All of it together too large for
the pipe is read by the writer process from the training process's memory where the
open's probe showed it can (``pull``: where those bytes are, in order; nothing follows
the frame). Elsewhere it is handed over in a memfd, named by ``delta_file``: the frame
goes first, then the parent fills the memfd a slice at a time and after each slice sends
its new length (:data:`ARRIVED`) on the pipe, the last one equal to ``delta_bytes``; the
child writes each slice as it lands and always reads every length before it answers.

Parent -> child: :class:`OpenRequest`, then one :class:`CommitRequest` per checkpoint.
Child -> parent: :class:`OpenReply`, then one :class:`CommitReply` per request.

Paths cross as bytes (``os.fsencode``) wherever they may not be valid UTF-8 (a POSIX
name is any bytes; msgpack strings must be UTF-8): the location, a commit's path.
"""

from __future__ import annotations

import os
import struct
from typing import Any, TypeVar

import msgspec

from . import errors
from .commit import CommitReport
from .errors import CheckpointError, StorageError
from .snapshot import SnapshotMeta

__all__ = [
    "CommitReply",
    "CommitRequest",
    "LogDelta",
    "OpenReply",
    "OpenRequest",
    "StateRef",
    "WireError",
    "decode",
    "encode",
    "rebuild_error",
    "reply_for",
    "report_of",
]

FRAME = struct.Struct(">I")
# How much of a memfd hand-over has been written into it so far.
ARRIVED = struct.Struct(">Q")
# The parent fills a large hand-over, and the child reads it, in slices of this size.
HANDOFF_SLICE_BYTES = 8 * 1024 * 1024
_T = TypeVar("_T")
# The writer process's exit code after an error it printed itself (a traceback on
# stderr); with any other code there is no traceback of ours to point at.
EXIT_CRASHED = 3


def _text(s: str) -> str:
    # An error message naming a non-UTF-8 path: shown with the odd bytes escaped.
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class WireError(msgspec.Struct, frozen=True):
    """An exception raised on the other side."""

    type: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        """The wire form of an exception."""
        return cls(type(exc).__name__, _text(str(exc)))


class OpenRequest(msgspec.Struct, frozen=True):
    """Open a checkpoints location: lock it, clean leftovers, list what is there."""

    location: bytes
    options: dict[str, Any]
    # The training process: named in DirectoryLockedError, not this helper.
    owner_pid: int
    # Kept by the training process across writer-process restarts (object-storage lock).
    lock_token: str
    # The training process's /proc/self/mem, inherited at this fd number, and bytes at
    # an address of it: the writer process tries to read them there (``memory_pull``)
    # and says whether it could.
    mem_fd: int = -1
    probe_address: int = 0
    probe: bytes = b""


class OpenReply(msgspec.Struct, frozen=True):
    """The checkpoints already committed (name, episode, score), or why opening failed."""

    records: list[tuple[str, int, float | None]] = []
    error: WireError | None = None
    # The probe read back: large hand-overs may be read from the training process.
    can_pull: bool = False


class LogDelta(msgspec.Struct, frozen=True):
    """A named log whose bytes from ``base`` on follow the memory's."""

    log_id: str
    entries: int
    nbytes: int
    base: int


class StateRef(msgspec.Struct, frozen=True):
    """A state key: its file and version, and its ``nbytes`` bytes if ``sent``."""

    file: str
    version: str
    nbytes: int
    sent: bool


class CommitRequest(msgspec.Struct, frozen=True):
    """Commit one snapshot whose memory bytes from ``base`` on follow the frame."""

    meta: SnapshotMeta
    log_id: str
    entries: int
    nbytes: int
    base: int
    payload: int
    delta_file: str | None = None
    delta_bytes: int = 0
    # Or where the ``delta_bytes`` bytes are in the training process, to be read there.
    pull: list[tuple[int, int]] | None = None
    logs: dict[str, LogDelta] = {}
    state: dict[str, StateRef] = {}


class CommitReply(msgspec.Struct, frozen=True):
    """What a commit did, or its error, or a request for the whole memory."""

    report: CommitReport | None = None
    error: WireError | None = None
    resend_full: bool = False
    # The training process's memory could not be read after all: send it another way.
    cannot_pull: bool = False
    # The report's path when it is not valid UTF-8 (the report then carries "").
    path: bytes | None = None


class Ready(msgspec.Struct, frozen=True):
    """Sent after a commit's reply that says ``preparing``, once the next commit's prefix
    is copied ahead (or that failed): the parent sends the next snapshot only after it."""


def reply_for(report: CommitReport) -> CommitReply:
    """The reply that carries ``report`` whatever bytes its path and messages hold."""
    try:
        report.path.encode("utf-8")
    except UnicodeEncodeError:
        path: bytes | None = os.fsencode(report.path)
        report = msgspec.structs.replace(report, path="")
    else:
        path = None
    if report.retention_error is not None:
        report = msgspec.structs.replace(report, retention_error=_text(report.retention_error))
    return CommitReply(report=report, path=path)


def report_of(reply: CommitReply) -> CommitReport:
    """The report :func:`reply_for` sent, its path restored."""
    assert reply.report is not None
    if reply.path is None:
        return reply.report
    return msgspec.structs.replace(reply.report, path=os.fsdecode(reply.path))


_ENCODER = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    """One frame."""
    body = _ENCODER.encode(msg)
    return FRAME.pack(len(body)) + body


def decoder(kind: type[_T]) -> msgspec.msgpack.Decoder[_T]:
    """A decoder of frame bodies of one kind."""
    return msgspec.msgpack.Decoder(kind)


def decode(dec: msgspec.msgpack.Decoder[_T], body: bytes) -> _T:
    """A frame body."""
    return dec.decode(body)


# Errors rebuilt as themselves on the parent's side; anything else is a StorageError.
_KEPT = ("DirectoryLockedError", "ConfigError", "WriterFailedError", "StorageError")


def rebuild_error(err: WireError) -> CheckpointError:
    """The exception a writer-process error stands for, in this process."""
    if err.type in _KEPT:
        cls: type[CheckpointError] = getattr(errors, err.type)
        return cls(err.message)
    return StorageError(f"{err.type}: {err.message}" if err.type else err.message)
