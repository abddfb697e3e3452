"""Embedding the writer in a plain asyncio agent: asyncio-native tasks and cancellation."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

import pytest

from ckptwriter import CheckpointWriter, MemoryLog, load_checkpoint
from conftest import add_episode, snapshot


@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup needs Python 3.11")
async def test_writer_shared_by_concurrent_agent_tasks(tmp_path: Path) -> None:
    """Agent tasks in an asyncio.TaskGroup submit through one writer; all become durable."""
    mem = MemoryLog()
    # One run, so one episode counter: a writer refuses to go back to a lower episode.
    episodes = itertools.count(1)
    async with CheckpointWriter(tmp_path, keep_last=3) as writer:

        async def agent() -> None:
            for _ in range(5):
                ep = next(episodes)
                add_episode(mem, ep)
                await writer.submit(snapshot(mem, ep))
                await asyncio.sleep(0.001)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(agent())
            tg.create_task(agent())
        await writer.flush()
        assert writer.stats.written == 10
    assert load_checkpoint(tmp_path).memory.to_jsonl() == mem.to_jsonl()


@pytest.mark.asyncio
async def test_task_cancel_leaves_a_valid_latest(tmp_path: Path) -> None:
    """task.cancel() on a training task stops it; what latest names is complete."""
    mem = MemoryLog()
    started = asyncio.Event()

    async def train() -> None:
        async with CheckpointWriter(tmp_path) as writer:
            for ep in range(1, 10_000):
                add_episode(mem, ep)
                await writer.submit(snapshot(mem, ep))
                if ep == 3:
                    started.set()
                await asyncio.sleep(0)

    task = asyncio.create_task(train())
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not list(tmp_path.glob(".tmp-*"))
    loaded = load_checkpoint(tmp_path / "latest")
    assert loaded.runtime.episode_index >= 1
    assert mem.to_jsonl().startswith(loaded.memory.to_jsonl())
