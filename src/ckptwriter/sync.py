"""The writer for a synchronous training loop.

The async :class:`CheckpointWriter` runs on its own event loop in a background thread
(an anyio blocking portal). ``submit`` captures the snapshot in the caller's thread, so
isolation is the same as in the async writer, then hands the frozen capture over.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .errors import WriterClosedError
from .snapshot import Snapshot
from .writer import CheckpointHandle, CheckpointResult, CheckpointWriter, WriterStats

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

__all__ = ["SyncCheckpointHandle", "SyncCheckpointWriter"]


class SyncCheckpointHandle:
    """Blocking twin of :class:`CheckpointHandle`."""

    __slots__ = ("_handle", "_portal")

    def __init__(self, handle: CheckpointHandle, portal: BlockingPortal) -> None:
        self._handle = handle
        self._portal = portal

    @property
    def episode_index(self) -> int:
        """Episode of the submitted snapshot."""
        return self._handle.episode_index

    @property
    def coalesced(self) -> bool:
        """True if a newer snapshot replaced this one before it was written."""
        return self._handle.coalesced

    def done(self) -> bool:
        """True once durable or failed."""
        return self._handle.done()

    def wait(self) -> CheckpointResult:
        """Block until durable. Raises WriterFailedError if it could not be written."""
        return self._portal.call(self._handle.wait)


class SyncCheckpointWriter:
    """:class:`CheckpointWriter` for synchronous code; same arguments, used with ``with``.

    Example::

        with SyncCheckpointWriter("checkpoints", keep_last=5) as writer:
            for ep in range(1, 101):
                ...
                writer.submit(Snapshot(ep, steps, "MyAgent", memory))
    """

    def __init__(self, checkpoint_dir: str | Path | None = None, **kwargs: Any) -> None:
        self._writer = CheckpointWriter(checkpoint_dir, **kwargs)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._writer_cm: AbstractContextManager[CheckpointWriter] | None = None

    def __enter__(self) -> Self:
        if self._portal is not None:
            raise WriterClosedError("SyncCheckpointWriter is already open")
        cm = start_blocking_portal()
        portal = cm.__enter__()
        # One portal task enters and exits the writer: anyio cancel scopes must be exited
        # by the task that entered them.
        writer_cm = portal.wrap_async_context_manager(self._writer)
        try:
            writer_cm.__enter__()
        except BaseException:
            cm.__exit__(*sys.exc_info())
            raise
        self._portal_cm, self._portal, self._writer_cm = cm, portal, writer_cm
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        portal, cm = self._portal, self._portal_cm
        if portal is None or cm is None:
            return
        self._portal = self._portal_cm = None
        try:
            # A KeyboardInterrupt in the loop is still a reason to save what is queued.
            drain_exc = exc if isinstance(exc, Exception) else None
            assert self._writer_cm is not None
            self._writer_cm.__exit__(type(drain_exc) if drain_exc else None, drain_exc, None)
        finally:
            cm.__exit__(None, None, None)

    def close(self) -> None:
        """Drain and stop; raises WriterFailedError if a checkpoint failed."""
        self.__exit__(None, None, None)

    def _require(self) -> BlockingPortal:
        if self._portal is None:
            raise WriterClosedError(
                "SyncCheckpointWriter is not open: use `with SyncCheckpointWriter(...) as w:`"
            )
        return self._portal

    def submit(self, snapshot: Snapshot) -> SyncCheckpointHandle:
        """Capture and queue a snapshot; see :meth:`CheckpointWriter.submit`."""
        portal = self._require()
        captured = snapshot.capture()
        return SyncCheckpointHandle(portal.call(self._writer.submit, captured), portal)

    def flush(self) -> None:
        """Block until everything submitted is durable."""
        self._require().call(self._writer.flush)

    @property
    def stats(self) -> WriterStats:
        """See :attr:`CheckpointWriter.stats`."""
        return self._writer.stats
