"""What ``submit`` returns: a handle on one submitted snapshot, and its result."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from .errors import WriterFailedError
from .snapshot import CapturedSnapshot

if TYPE_CHECKING:
    from .commit import CommitReport

__all__ = ["CheckpointHandle", "CheckpointResult", "Job"]

log = logging.getLogger("ckptwriter")


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """A checkpoint that is durable on disk, and what it cost.

    ``loop_seconds`` is what the training loop paid in ``submit`` (capture + enqueue,
    including any ``block`` stall); the other timings were spent off the loop.
    ``bytes_written`` counts the bytes really written (what was appended to a log, the
    files that changed, ``runtime.json``); ``bytes_reused`` those the checkpoint got from
    the previous one instead (a copied prefix, the ``files_linked`` files linked whole).
    A coalesced handle's result is the newer snapshot's that replaced it: its
    ``latency_seconds`` runs from that snapshot's capture, not from this submit.
    ``prepare_seconds``: the writer's time after the previous commit copying ahead the
    memory prefix this commit extended (ext4, tmpfs: filesystems without clones), not
    included in ``write_seconds``.
    """

    name: str
    path: str
    episode_index: int
    bytes_written: int
    bytes_serialized: int
    entries_serialized: int
    incremental: bool
    loop_seconds: float
    queue_wait_seconds: float
    serialize_seconds: float
    write_seconds: float
    latency_seconds: float
    deleted: tuple[str, ...] = ()
    bytes_reused: int = 0
    files_linked: int = 0
    prepare_seconds: float = 0.0

    @classmethod
    def from_report(cls, o: CommitReport, *, loop_seconds: float, queue_wait_seconds: float,
                    latency_seconds: float) -> CheckpointResult:
        """The result of the commit ``o`` reports, with the writer's own timings (and
        what went wrong beside it, logged: retention, the best pointer)."""
        if o.retention_error is not None:
            log.warning("retention could not delete an old checkpoint: %s", o.retention_error)
        if o.best_error is not None:
            log.warning("%s", o.best_error)
        return cls(
            name=o.name, path=o.path, episode_index=o.episode_index,
            bytes_written=o.bytes_written, bytes_serialized=o.bytes_serialized,
            entries_serialized=o.entries_serialized, incremental=o.incremental,
            loop_seconds=loop_seconds, queue_wait_seconds=queue_wait_seconds,
            serialize_seconds=o.serialize_seconds, write_seconds=o.write_seconds,
            latency_seconds=latency_seconds, deleted=o.deleted,
            bytes_reused=o.bytes_reused, files_linked=o.files_linked,
            prepare_seconds=o.prepare_seconds,
        )


class Job:
    """One queued snapshot and the handle that waits for it (the writer's side)."""


    __slots__ = ("enqueued_at", "error", "event", "handle", "loop_seconds", "result",
                 "snap", "started")

    def __init__(self, snap: CapturedSnapshot) -> None:
        self.snap = snap
        self.event = anyio.Event()
        self.started = False
        self.enqueued_at = 0.0
        self.loop_seconds = 0.0
        self.result: CheckpointResult | None = None
        self.error: BaseException | None = None
        # The newest handle only: older ones were marked coalesced when they were replaced,
        # and keeping them all would grow without bound while a slow write is in flight.
        self.handle: CheckpointHandle | None = None


    def absorb(self, handle: CheckpointHandle) -> None:
        """Take the newer snapshot of ``handle`` in place of this queued one (coalesce).

        Older handles now resolve when the newer state is durable, and say so.
        """
        if self.handle is not None:
            self.handle.coalesced = True
        self.snap = handle._job.snap
        handle._job = self
        self.handle = handle


class CheckpointHandle:
    """The future of one submitted snapshot.

    ``await handle.wait()`` returns once the snapshot (or, if it was coalesced, the newer
    snapshot that replaced it) is durable on disk.
    """

    __slots__ = ("_job", "coalesced", "episode_index")

    def __init__(self, job: Job) -> None:
        self._job = job
        self.episode_index = job.snap.episode_index
        self.coalesced = False

    def done(self) -> bool:
        """True once the checkpoint is durable or has failed."""
        return self._job.event.is_set()

    async def wait(self) -> CheckpointResult:
        """Wait until durable.

        Raises:
            WriterFailedError: this checkpoint could not be written.
        """
        await self._job.event.wait()
        return self.result()

    def result(self) -> CheckpointResult:
        """The result of a done handle (see :meth:`done`), without waiting.

        Raises:
            WriterFailedError: this checkpoint could not be written.
            RuntimeError: the checkpoint is not done yet.
        """
        if not self._job.event.is_set():
            raise RuntimeError("checkpoint not written yet: await handle.wait()")
        if self._job.error is not None:
            raise WriterFailedError(
                f"checkpoint for episode {self.episode_index} was not written: {self._job.error}"
            ) from self._job.error
        assert self._job.result is not None
        return self._job.result


