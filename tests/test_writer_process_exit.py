"""The writer process's exit on close (issue 13's drain): fast, and nothing left behind.

On EOF the writer process releases the directory lock, flushes its streams and leaves
with ``os._exit`` (no interpreter teardown on the parent's critical path). These tests
pin what that must keep: the exit code is 0, no process is left, the lock is free the
moment ``close`` returns, and every acknowledged checkpoint is there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ckptwriter import CheckpointWriter, MemoryLog, Observation, Snapshot, load_checkpoint


def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == me and fields[0] not in ("Z", "X"):
                kids.add(int(entry))
    return kids


@pytest.mark.anyio
async def test_close_with_a_checkpoint_in_flight_leaves_no_process_and_frees_the_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Leaving the context right after a submit: the checkpoint is durable, the writer
    process is gone (exit code 0: no warning), and a new writer opens the directory."""
    before = _children()
    log = MemoryLog([Observation(content=f"entry {i}") for i in range(2000)])
    root = tmp_path / "ckpts"
    with caplog.at_level(logging.WARNING, logger="ckptwriter"):
        async with CheckpointWriter(root) as writer:
            assert writer.executor == "process"
            await (await writer.submit(Snapshot(1, 1, "A", log))).wait()
            log.extend([Observation(content="last")])
            handle = await writer.submit(Snapshot(2, 2, "A", log))
    assert (await handle.wait()).episode_index == 2
    assert _children() <= before
    assert not [r for r in caplog.records if "exited with code" in r.getMessage()]
    async with CheckpointWriter(root) as again:  # the lock is free at once
        assert [r.episode_index for r in again.checkpoints] == [1, 2]
    loaded = load_checkpoint(root)
    assert loaded.runtime.episode_index == 2
    assert len(loaded.memory) == 2001


def test_writer_process_exit_skips_teardown_after_flushing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``run`` returns main's code through ``os._exit``, after flushing stderr."""
    from ckptwriter import writer_process

    calls: list[object] = []
    monkeypatch.setattr(writer_process, "main", lambda: 0)

    class _Flushed(Exception):
        pass

    def fake_exit(code: int) -> None:
        calls.append(code)
        raise _Flushed

    monkeypatch.setattr(writer_process.os, "_exit", fake_exit)
    with pytest.raises(_Flushed):
        writer_process.run()
    assert calls == [0]



@pytest.mark.parametrize("executor", ["process", "thread"])
def test_a_task_cancelled_while_its_writer_drains_leaves_no_writer(
    tmp_path: Path, executor: str
) -> None:
    """asyncio's own task.cancel() while `async with CheckpointWriter` drains a large
    commit (an anyio shield does not hold it off): the block still waits for the
    writer, so no writer is left committing with the lock (a reopen at once got
    DirectoryLockedError), and the commit lands whole."""
    import asyncio
    import contextlib

    mem = MemoryLog()
    while mem.nbytes < 60 << 20:
        mem.append(Observation(content=f"m{mem.nbytes}" * 700))
    before = _children()

    async def main() -> None:
        submitted = asyncio.Event()

        async def train() -> None:
            async with CheckpointWriter(tmp_path, executor=executor, fsync=False) as w:
                await w.submit(Snapshot(1, 1, "A", mem))
                submitted.set()

        task = asyncio.create_task(train())
        await submitted.wait()
        await asyncio.sleep(0.01)  # inside the drain
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert _children() <= before
        async with CheckpointWriter(tmp_path, executor=executor, fsync=False):
            pass

    asyncio.run(main())
    assert [p.name for p in tmp_path.glob("ep_*")] == ["ep_000001"]  # landed whole
    assert load_checkpoint(tmp_path).memory.to_jsonl() == mem.to_jsonl()
