"""The writer for a synchronous training loop.

The async :class:`CheckpointWriter` runs on its own event loop in a background thread
(an anyio blocking portal). ``submit`` captures the snapshot in the caller's thread, so
isolation is the same as in the async writer, then hands the frozen capture over.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .errors import CheckpointError, WriterClosedError
from .handles import CheckpointHandle, CheckpointResult
from .options import DEFAULTS, ExecutorKind, OnBacklog, OnError
from .retention import CheckpointRecord, Mode, Strategy
from .snapshot import CapturedSnapshot, Snapshot
from .stats import WriterStats
from .storage import Backend
from .writer import CheckpointWriter

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

__all__ = ["SyncCheckpointHandle", "SyncCheckpointWriter"]

log = logging.getLogger("ckptwriter")


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
        if self._handle.done():
            # Also after the writer closed, when its event loop is gone.
            return self._handle.result()
        return self._portal.call(self._handle.wait)


class SyncCheckpointWriter:
    """:class:`CheckpointWriter` for synchronous code; same arguments, used with ``with``.

    Args:
        checkpoint_dir, strategy, keep_last, mode, keep_every, max_pending, on_backlog,
        fsync, on_error,
        protect, storage, executor, storage_options: as for :class:`CheckpointWriter`,
        with the same defaults (:class:`~ckptwriter.options.WriterOptions`' own).

    Raises:
        ConfigError: an invalid option or strategy/keep_last combination.

    Example::

        with SyncCheckpointWriter("checkpoints", keep_last=5) as writer:
            for ep in range(1, 101):
                ...
                writer.submit(Snapshot(ep, steps, "MyAgent", memory))
    """

    def __init__(
        self,
        checkpoint_dir: str | Path | None = None,
        *,
        strategy: Strategy | None = DEFAULTS.strategy,
        keep_last: int | None = DEFAULTS.keep_last,
        mode: Mode = DEFAULTS.mode,
        keep_every: int | None = DEFAULTS.keep_every,
        max_pending: int = DEFAULTS.max_pending,
        on_backlog: OnBacklog = DEFAULTS.on_backlog,
        fsync: bool = DEFAULTS.fsync,
        on_error: OnError = DEFAULTS.on_error,
        protect: Collection[str] = DEFAULTS.protect,
        storage: Backend | None = None,
        executor: ExecutorKind = DEFAULTS.executor,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._writer = CheckpointWriter(
            checkpoint_dir, strategy=strategy, keep_last=keep_last, mode=mode,
            keep_every=keep_every, max_pending=max_pending,
            on_backlog=on_backlog, fsync=fsync, on_error=on_error, protect=protect,
            storage=storage, executor=executor, storage_options=storage_options,
        )
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
        writer_cm, self._writer_cm = self._writer_cm, None
        assert writer_cm is not None
        try:
            if isinstance(exc, BaseException) and not isinstance(exc, Exception):
                # Ctrl-C: still save what is queued, but the interrupt is what the caller
                # must see, not a failure of that last save.
                try:
                    writer_cm.__exit__(None, None, None)
                except CheckpointError as failed:
                    log.warning("checkpoints queued at interrupt were not saved: %s", failed)
            else:
                writer_cm.__exit__(exc_type, exc, tb)
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

    def submit(self, snapshot: Snapshot | CapturedSnapshot, *,
               replace: bool = False) -> SyncCheckpointHandle:
        """Capture and queue a snapshot; see :meth:`CheckpointWriter.submit`.

        ``stats`` counts the loop time from here, capture and thread hop included.

        Raises:
            CheckpointExistsError: the episode is already in the directory, not written
                yet, or below the newest there; pass ``replace=True`` to write it anyway.
        """
        portal = self._require()
        t0 = time.perf_counter()
        captured = snapshot.capture() if isinstance(snapshot, Snapshot) else snapshot
        # The writer counts from t0, so its stats include this capture and the hop to
        # its thread (everything but the return hop, which nothing can count there).
        handle = portal.call(partial(self._writer.submit, captured, replace=replace,
                                     started_at=t0))
        return SyncCheckpointHandle(handle, portal)

    def flush(self) -> None:
        """Block until everything submitted is durable."""
        self._require().call(self._writer.flush)

    @property
    def stats(self) -> WriterStats:
        """See :attr:`CheckpointWriter.stats`."""
        return self._writer.stats

    @property
    def location(self) -> str:
        """Where checkpoints go."""
        return self._writer.location

    @property
    def executor(self) -> str:
        """``"process"`` or ``"thread"``: where the blocking work runs."""
        return self._writer.executor

    @property
    def checkpoints(self) -> list[CheckpointRecord]:
        """Checkpoints the writer knows are committed, oldest first."""
        return self._writer.checkpoints

    @property
    def best(self) -> CheckpointRecord | None:
        """See :attr:`CheckpointWriter.best`."""
        return self._writer.best
