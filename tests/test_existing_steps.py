"""Existing steps: ``submit`` refuses an episode already there, or below the newest there.

The fault the issue reported: a writer restarted at episode 1 in a directory holding
episodes 10, 15 and 20 overwrote ep 10, retention deleted its new ep 5, and ``latest``
moved back. Now ``submit`` raises :class:`CheckpointExistsError` at once unless
``replace=True``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from _fault_util import (
    FaultStorage,
    build_checkpoints,
    memory_until,
    raise_eio,
    snapshot,
    tree_digest,
)
from ckptwriter import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointWriter,
    SyncCheckpointWriter,
    list_checkpoints,
    load_checkpoint,
)
from ckptwriter.storage import LocalStorage
from ckptwriter.storage.base import PendingCheckpoint

FIX = (r"Write to a new checkpoint directory, continue from an episode above {n}, or pass "
       r"replace=True to submit\(\) to write {name} anyway \(latest then names it\)\.")
# Only for an episode that exists: a resume may have loaded a latest a kill left behind.
RELOAD = (r" If this run resumed from a checkpoint below episode {n}, load the directory "
          r"again now: latest names the newest committed one once a writer has opened it\.")


def _history(root: Path, episodes: tuple[int, ...] = (10, 15, 20), keep: int = 3) -> None:
    """A directory another run left: checkpoints at ``episodes`` (keep_last=keep)."""
    with SyncCheckpointWriter(root, keep_last=keep, executor="thread") as w:
        for ep in episodes:
            w.submit(snapshot(ep, memory_until(ep))).wait()


def _names(root: Path) -> list[str]:
    return [i.name for i in list_checkpoints(root)]


@pytest.mark.parametrize("executor", ["thread", "process"])
@pytest.mark.parametrize("first", [pytest.param(1, id="below"), pytest.param(10, id="oldest"),
                                   pytest.param(20, id="newest")])
def test_restart_at_an_existing_or_lower_episode_is_refused_and_changes_nothing(
    tmp_path: Path, executor: str, first: int
) -> None:
    """A writer restarted at ep 1, 10 or 20 over ep 10/15/20: refused at submit, disk as it was."""
    root = tmp_path / "c"
    _history(root)
    before = tree_digest(root)
    why = (rf"episode {first} is already checkpointed in {root} \(ep_{first:06d}; the "
           r"newest there is episode 20\)" if first in (10, 20) else
           rf"episode 1 is below the newest checkpoint in {root}, episode 20: writing it "
           r"would go back in that history \(retention, which orders by episode, would "
           r"delete it first, and latest would move back\)")
    with SyncCheckpointWriter(root, keep_last=3, executor=executor) as w:
        with pytest.raises(CheckpointExistsError, match=(
            rf"^Not saved: {why}\. " + FIX.format(n=20, name=f"ep_{first:06d}")
            + (RELOAD.format(n=20) if first in (10, 20) else "") + "$"
        )) as info:
            w.submit(snapshot(first, memory_until(first)))
        assert isinstance(info.value, CheckpointError)
        assert (info.value.episode_index, info.value.newest_episode) == (first, 20)
        assert info.value.directory == str(root)
        assert w.stats.submitted == 0
        after = tree_digest(root)
        assert {k: v for k, v in after.items() if k != ".lock"} == \
            {k: v for k, v in before.items() if k != ".lock"}
        # The writer is not failed: the run can go on above the newest episode.
        w.submit(snapshot(21, memory_until(21))).wait()
    assert _names(root) == ["ep_000015", "ep_000020", "ep_000021"]


class _Gate(LocalStorage):
    """A disk whose commits wait until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=False)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def begin(self, name: str) -> PendingCheckpoint:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().begin(name)


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["in-flight", "queued"])
async def test_the_same_episode_submitted_again_before_it_is_written_is_refused(
    tmp_path: Path, where: str
) -> None:
    """Two submits of ep 2 (the first still in flight or queued): the second is refused."""
    root = tmp_path / "c"
    storage = _Gate(root)
    async with CheckpointWriter(storage=storage, max_pending=2) as w:
        first = await w.submit(snapshot(1, memory_until(1)))
        if where == "queued":
            await w.submit(snapshot(2, memory_until(2)))
        again = 1 if where == "in-flight" else 2
        with pytest.raises(CheckpointExistsError, match=(
            rf"^Not saved: episode {again} was already submitted to this writer and is not "
            rf"written yet \(to {root}; the newest submitted is episode {again}\)\. "
        )):
            await w.submit(snapshot(again, memory_until(again)))
        storage.gate.set()
        await first.wait()
    assert _names(root) == ["ep_000001", "ep_000002"][: 1 if where == "in-flight" else 2]


@pytest.mark.anyio
async def test_a_failed_episode_may_be_submitted_again(tmp_path: Path) -> None:
    """A commit that failed created nothing: submitting that episode again is no existing step."""
    root = tmp_path / "c"
    storage = FaultStorage(root, step="files_written", episode=2, action=raise_eio)
    async with CheckpointWriter(storage=storage, on_error="warn") as w:
        await (await w.submit(snapshot(1, memory_until(1)))).wait()
        failed = await w.submit(snapshot(2, memory_until(2)))
        with pytest.raises(CheckpointError):
            await failed.wait()
        storage.fault_episode = -1
        await (await w.submit(snapshot(2, memory_until(2)))).wait()
    assert _names(root) == ["ep_000001", "ep_000002"]


def test_replace_recommits_an_existing_episode(tmp_path: Path) -> None:
    """replace=True writes the episode again: the new contents replace the old, latest on it."""
    root = tmp_path / "c"
    _history(root, (1, 2))
    with SyncCheckpointWriter(root, executor="thread") as w:
        w.submit(snapshot(2, memory_until(3)), replace=True).wait()
    assert load_checkpoint(root / "latest").memory.to_jsonl() == memory_until(3).to_jsonl()
    assert _names(root) == ["ep_000001", "ep_000002"]


def test_replace_going_back_writes_the_new_history_and_retention_orders_by_episode(
    tmp_path: Path,
) -> None:
    """replace=True below the newest: latest names it; last_n keeps the higher episodes."""
    root = tmp_path / "c"
    _history(root)
    with SyncCheckpointWriter(root, keep_last=3, executor="thread") as w:
        w.submit(snapshot(1, memory_until(1)), replace=True).wait()
        # The one just written is never deleted, though three higher episodes are newer.
        assert _names(root) == ["ep_000001", "ep_000010", "ep_000015", "ep_000020"]
        assert os.readlink(root / "latest") == "ep_000001"
        # Still below the newest there: each such submit must say replace=True.
        with pytest.raises(CheckpointExistsError, match=r"^Not saved: episode 2 is below"):
            w.submit(snapshot(2, memory_until(2)))
        w.submit(snapshot(2, memory_until(2)), replace=True).wait()
    assert _names(root) == ["ep_000002", "ep_000010", "ep_000015", "ep_000020"]
    assert load_checkpoint(root / "latest").runtime.episode_index == 2


@pytest.mark.anyio
async def test_refused_on_object_storage_too(tmp_path: Path) -> None:
    """memory://: the same refusal, before anything reaches the store."""
    import fsspec

    url = f"memory://ckptwriter-steps-{os.getpid()}/c"
    try:
        async with CheckpointWriter(url) as w:
            await (await w.submit(snapshot(5, memory_until(5)))).wait()
        async with CheckpointWriter(url) as w:
            with pytest.raises(CheckpointExistsError, match=(
                rf"^Not saved: episode 3 is below the newest checkpoint in {url}, episode 5: "
            )):
                await w.submit(snapshot(3, memory_until(3)))
    finally:
        fsspec.filesystem("memory").rm(f"/ckptwriter-steps-{os.getpid()}", recursive=True)


def test_a_new_directory_and_a_higher_episode_are_fine(tmp_path: Path) -> None:
    """The fixes the message offers work: another directory, or an episode above the newest."""
    build_checkpoints(tmp_path / "c", 3, executor="thread")
    with SyncCheckpointWriter(tmp_path / "other", executor="thread") as w:
        w.submit(snapshot(1, memory_until(1))).wait()
    with SyncCheckpointWriter(tmp_path / "c", executor="thread") as w:
        w.submit(snapshot(4, memory_until(4))).wait()
    assert _names(tmp_path / "c")[-1] == "ep_000004"
