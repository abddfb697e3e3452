"""Shared (hard-linked) files over long runs: the record of the writer's own ctime moves
stays bounded and never forgets a move a live token needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptwriter import (
    AgentState,
    CheckpointFallbackWarning,
    CheckpointNotFoundError,
    CheckpointWriter,
    MemoryLog,
    Observation,
    Snapshot,
    SyncCheckpointWriter,
    load_checkpoint,
)
from ckptwriter.storage import local_reuse

pytestmark = pytest.mark.anyio


def _snap(ep: int, mem: MemoryLog, state: AgentState) -> Snapshot:
    return Snapshot(ep, ep, "A", mem, state=state)


async def test_own_changes_bound_never_forgets_moves_a_live_token_needs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unchanged keys stay linked however many ctime moves a long run records."""
    # 2**16 moves are reached by a state of ~16k unchanged keys in 2-3 commits with
    # keep_last; a small bound shows the same with 4 keys.
    monkeypatch.setattr(local_reuse, "_MAX_CHANGES", 8)
    mem = MemoryLog()
    state = AgentState({f"k{i}": {"v": i} for i in range(4)})
    linked = []
    async with CheckpointWriter(tmp_path, keep_last=1, executor="thread", fsync=False) as w:
        for ep in range(1, 8):
            mem.append(Observation(content=f"o{ep}"))
            r = await (await w.submit(_snap(ep, mem, state))).wait()
            linked.append(r.files_linked)
    # Every commit after the first links the 4 unchanged state files (agent.json too).
    assert all(n >= 4 for n in linked[1:]), linked


# One event loop is enough: the record is the backend's, below any loop (and 10,000 keys
# take a while).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_long_run_with_many_unchanged_keys_keeps_committing(tmp_path: Path) -> None:
    """A state of 10,000 unchanged keys under keep_last=1: every commit succeeds (real bound)."""
    mem = MemoryLog()
    state = AgentState({f"k{i}": i for i in range(10_000)})
    async with CheckpointWriter(tmp_path, keep_last=1, executor="thread", fsync=False) as w:
        for ep in range(1, 7):
            mem.append(Observation(content=f"o{ep}"))
            await (await w.submit(_snap(ep, mem, state))).wait()


def test_a_damaged_file_every_checkpoint_shares_is_reported_as_broken(tmp_path: Path) -> None:
    """keep_last=2 with a key that never changes: one damaged file breaks every checkpoint
    on disk. Loading latest says there is no valid checkpoint and names each broken one,
    never offering them as alternatives ("nearby")."""
    mem, state = MemoryLog(), AgentState({"weights": b"\x00" * 1000})
    with SyncCheckpointWriter(tmp_path, keep_last=2, executor="thread", fsync=False) as w:
        for ep in range(1, 4):
            mem.append(Observation(content=f"o{ep}"))
            w.submit(_snap(ep, mem, state)).wait()
    with open(tmp_path / "ep_000003" / "state.weights.bin", "ab") as f:
        f.write(b"X")  # ep 2 and ep 3 hold this inode
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(tmp_path)
    text = str(info.value)
    assert "Every checkpoint there is broken: ep_000003: state.weights.bin: size 1001 " \
        "bytes, expected 1000 (appended to?); ep_000002: state.weights.bin" in text
    assert "nearby" not in text


def test_the_fallback_warning_names_every_broken_checkpoint_it_skipped(tmp_path: Path) -> None:
    """ep 1 has its own copy of the key; ep 2-3 share a damaged one: latest falls back to
    ep 1, and the warning says ep 2 was skipped too."""
    mem, state = MemoryLog(), AgentState({"k": "v1"})
    with SyncCheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        for ep in range(1, 4):
            if ep == 2:
                state["k"] = "v2"
            mem.append(Observation(content=f"o{ep}"))
            w.submit(_snap(ep, mem, state)).wait()
    with open(tmp_path / "ep_000003" / "state.k.json", "ab") as f:
        f.write(b" ")
    with pytest.warns(CheckpointFallbackWarning,
                      match=r"latest points at ep_000003, which is broken .*; skipped the "
                            r"broken ep_000002; falling back .*ep_000001$"):
        ck = load_checkpoint(tmp_path)
    assert ck.state["k"] == "v1"
