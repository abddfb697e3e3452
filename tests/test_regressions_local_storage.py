"""Review regressions: storage/local.py and the Persister's retention pass (executor.py).

Each test fails on the code as reviewed and passes once the finding is fixed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ckptwriter import (
    MemoryLog,
    Observation,
    SyncCheckpointWriter,
    load_checkpoint,
    verify_checkpoint,
)
from ckptwriter.errors import WriterFailedError
from ckptwriter.storage import LocalStorage
from conftest import add_episode, snapshot


def _episodes(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("ep_"))


class _OneFailedRmtree(LocalStorage):
    """The first retention delete fails after its rename to .trash-* (EBUSY, EACCES, NFS)."""

    failed = False

    def _step(self, name: str) -> None:
        if name == "trash_renamed" and not self.failed:
            self.failed = True
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))


def test_retention_recovers_after_one_failed_delete(tmp_path: Path) -> None:
    """One failed delete does not stop retention for the rest of the run."""
    mem = MemoryLog()
    with SyncCheckpointWriter(storage=_OneFailedRmtree(tmp_path / "ck"), keep_last=2) as w:
        for ep in range(1, 11):
            add_episode(mem, ep)
            w.submit(snapshot(mem, ep)).wait()
    # As reviewed: the trashed name stays in Persister.known, every later pass fails on it
    # first (ENOENT) and stops, and nothing is deleted again: 9 checkpoints instead of 2.
    assert _episodes(tmp_path / "ck") == ["ep_000009", "ep_000010"]


def test_incremental_commit_falls_back_when_copy_file_range_is_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a usable copy_file_range (FUSE, gVisor, macOS) checkpoints are still written."""

    def unsupported(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    mem = MemoryLog()
    with SyncCheckpointWriter(storage=LocalStorage(tmp_path / "ck")) as w:
        for ep in (1, 2):
            add_episode(mem, ep)
            w.submit(snapshot(mem, ep)).wait()
    verify_checkpoint(tmp_path / "ck" / "ep_000002")


class _RmtreeFailsOnOldCopy(LocalStorage):
    """Removing the replaced copy of a checkpoint fails (EBUSY; an NFS .nfsXXXX file)."""

    def _remove(self, name: str) -> None:
        if name.startswith(".trash-"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), name)
        super()._remove(name)


def test_recommitting_an_episode_never_loses_the_existing_checkpoint(tmp_path: Path) -> None:
    """Writing an existing episode again keeps the old copy until the new one is in place."""
    mem = MemoryLog()
    add_episode(mem, 100)
    with SyncCheckpointWriter(tmp_path / "ck", executor="thread") as w:
        w.submit(snapshot(mem, 100)).wait()
    # Same episode again: checkpoint_on_start after resuming into an absolute checkpoint_dir.
    with SyncCheckpointWriter(storage=_RmtreeFailsOnOldCopy(tmp_path / "ck")) as w:
        w.submit(snapshot(mem, 100), replace=True).wait()
    # As reviewed: the old copy was renamed to .trash-* before the new one was in place,
    # the new one was then discarded, `latest` dangles and the next writer start deletes
    # the only copy. Either copy is fine; none is data loss.
    assert load_checkpoint(tmp_path / "ck").path.name == "ep_000100"


def test_relative_checkpoint_dir_is_fixed_when_the_writer_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative checkpoint_dir keeps meaning the same directory after the loop chdirs."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    mem = MemoryLog()
    with SyncCheckpointWriter("ck", executor="thread") as w:
        add_episode(mem, 1)
        w.submit(snapshot(mem, 1)).wait()
        os.chdir(tmp_path / "b")  # the training code (or a library) changes directory
        add_episode(mem, 2)
        w.submit(snapshot(mem, 2)).wait()
    assert _episodes(tmp_path / "a" / "ck") == ["ep_000001", "ep_000002"]


def test_failed_fsync_of_a_large_memory_file_fails_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync failing on a >= 8 MiB memory delta fails the commit, as it does for small ones."""
    # As reviewed, the large-delta path runs os.fsync in a bare threading.Thread: its
    # OSError goes to threading.excepthook and the commit goes on to move `latest`.
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "memory_" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))  # NFS reports it here
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    mem = MemoryLog([Observation(content="y" * 1000) for _ in range(10_000)])
    with (
        pytest.raises(WriterFailedError, match=r"quota"),
        SyncCheckpointWriter(storage=LocalStorage(tmp_path / "ck")) as w,
    ):
        w.submit(snapshot(mem, 1)).wait()
    assert _episodes(tmp_path / "ck") == []
