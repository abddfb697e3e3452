"""Review regressions: the writer's lifecycle (writer.py, sync.py) under cancellation.

Each test fails on the code as reviewed and passes once the finding is fixed.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from ckptwriter import (
    CheckpointHandle,
    CheckpointWriter,
    MemoryLog,
    SyncCheckpointWriter,
)
from ckptwriter.errors import WriterFailedError
from ckptwriter.storage import LocalStorage, PendingCheckpoint
from conftest import add_episode, snapshot


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both backends: cancellation semantics differ between them."""
    return str(request.param)


class _SlowCommit(LocalStorage):
    """Each commit takes 0.2 s, so later snapshots are still queued."""

    def _step(self, name: str) -> None:
        if name == "tmp_created":
            time.sleep(0.2)


class _SlowOpen(LocalStorage):
    """Opening takes 0.3 s (a big directory to scan, a slow network filesystem)."""

    def open(self, is_whole: Callable[[str], bool]) -> None:
        time.sleep(0.3)
        super().open(is_whole)


@pytest.mark.anyio
async def test_cancelled_writer_resolves_every_handle(tmp_path: Path) -> None:
    """Handles of snapshots a cancelled writer dropped are done (failed), never left hanging."""
    mem = MemoryLog()
    handles: list[CheckpointHandle] = []
    with anyio.CancelScope() as scope:
        async with CheckpointWriter(storage=_SlowCommit(tmp_path / "ck"), max_pending=4) as w:
            for ep in range(1, 5):
                add_episode(mem, ep)
                handles.append(await w.submit(snapshot(mem, ep)))
            scope.cancel()
            await anyio.sleep(1)
    # Anyone awaiting handle.wait() (or flush()) elsewhere would otherwise block forever.
    assert [h.done() for h in handles] == [True] * 4


@pytest.mark.anyio
async def test_cancel_during_enter_leaves_the_writer_cleanly_closed(tmp_path: Path) -> None:
    """A cancel that lands while the writer opens is a plain cancel: no RuntimeError, lock freed."""
    with anyio.move_on_after(0.1):
        async with CheckpointWriter(storage=_SlowOpen(tmp_path / "ck")):
            pass  # pragma: no cover - never reached
    async with CheckpointWriter(storage=LocalStorage(tmp_path / "ck")):
        pass


def test_sync_handle_wait_after_close_returns_the_result(tmp_path: Path) -> None:
    """SyncCheckpointHandle.wait() after the writer closed returns, as the async handle does."""
    mem = MemoryLog()
    add_episode(mem, 1)
    with SyncCheckpointWriter(tmp_path / "ck", executor="thread") as w:
        handle = w.submit(snapshot(mem, 1))
    assert handle.wait().name == "ep_000001"


class _FirstCommitFails(LocalStorage):
    """The first commit fails (ENOSPC) after a short while; later ones succeed."""

    commits = 0

    def begin(self, name: str) -> PendingCheckpoint:
        self.commits += 1
        if self.commits == 1:
            time.sleep(0.02)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().begin(name)


@pytest.mark.anyio
async def test_blocked_submit_after_a_failure_raises_writer_failed_not_index_error(
    tmp_path: Path,
) -> None:
    """A submit blocked on a full queue when a commit fails ends in WriterFailedError only."""
    # _write_one pops self._queued before the blocked submit appended its job to it: the
    # writer task dies of IndexError when the scheduler runs it first (trio: ~half the time).
    async def train(root: Path) -> None:
        mem = MemoryLog()
        add_episode(mem, 1)
        async with CheckpointWriter(storage=_FirstCommitFails(root), max_pending=1) as w:
            for ep in (1, 2, 3):
                await w.submit(snapshot(mem, ep))
            await w.flush()

    for i in range(30):
        with pytest.raises(WriterFailedError):
            await train(tmp_path / str(i))


class _AlwaysFails(LocalStorage):
    """Every commit fails (a full disk)."""

    def begin(self, name: str) -> PendingCheckpoint:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_sync_writer_lets_keyboard_interrupt_through(tmp_path: Path) -> None:
    """Ctrl-C in a sync loop reaches the caller even when the drained checkpoint fails."""
    # As reviewed, __exit__ drains on KeyboardInterrupt as if the body had ended normally,
    # so the writer's WriterFailedError replaces the KeyboardInterrupt.
    mem = MemoryLog()
    add_episode(mem, 1)

    def train() -> None:
        with SyncCheckpointWriter(storage=_AlwaysFails(tmp_path / "ck")) as w:
            w.submit(snapshot(mem, 1))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train()
