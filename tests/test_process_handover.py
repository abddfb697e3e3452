"""The writer process's large hand-over: written by the child while the loop still fills it.

Where the writer process cannot read the loop's memory (``test_memory_pull.py``), a
delta larger than the pipe crosses in a memfd the loop fills a slice at a time; the
child writes (and hashes) each slice as the lengths that follow the frame say it landed.
Every test here runs that way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from ckptwriter import (
    AgentState,
    CheckpointWriter,
    MemoryLog,
    Observation,
    Snapshot,
    load_checkpoint,
    memory_pull,
)
from ckptwriter import process_executor as pe
from ckptwriter.memory import MemoryCapture
from ckptwriter.options import WriterOptions
from conftest import add_episode, big_memory, files_match_their_digests, snapshot


@pytest.fixture(autouse=True)
def _memfd_hand_over(monkeypatch: pytest.MonkeyPatch) -> None:
    # As where no process may read another's memory: no probe, so no reading.
    monkeypatch.setattr(memory_pull, "supported", lambda: False)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.anyio
async def test_full_write_streamed_under_a_cpu_bound_loop_is_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory, a log and a state value spanning many slices, the loop busy between them:
    every file byte-identical with the sha256 runtime.json gives; the next commit, an
    incremental one, still finds the pipe in step."""
    monkeypatch.setattr(pe, "_HANDOFF_SLICE_BYTES", 1 << 20)  # many slices, small test
    mem, tool_log = big_memory(6), big_memory(3, "t")
    blob = bytes(range(256)) * 8192  # 2 MiB
    async with CheckpointWriter(tmp_path, executor="process", fsync=False) as w:
        h = await w.submit(snapshot(mem, 1, logs={"tools": tool_log},
                                    state={"blob": blob}))
        while not h.done():
            _burn(0.002)
            await anyio.lowlevel.checkpoint()
        r1 = await h.wait()
        add_episode(mem, 2)
        r2 = await (await w.submit(snapshot(mem, 2, logs={"tools": tool_log},
                                            state={"blob": blob}))).wait()
    assert (r1.incremental, r2.incremental) == (False, True)
    files = files_match_their_digests(Path(r1.path))
    assert mem.to_jsonl().startswith(next(v for k, v in files.items() if "memory" in k))
    assert tool_log.to_jsonl() in files.values()
    files_match_their_digests(Path(r2.path))
    loaded = load_checkpoint(tmp_path / "latest")
    assert loaded.memory.to_jsonl() == mem.to_jsonl()
    assert loaded.state["blob"] == blob


@pytest.mark.anyio
async def test_cancelled_mid_hand_over_keeps_the_pipe_in_step(tmp_path: Path) -> None:
    """A persist cancelled while the loop is filling the memfd still finishes its commit
    (the child waits for every byte announced), and the next one gets its own reply."""
    mem = big_memory(20)
    ex = pe.ProcessExecutor(str(tmp_path), WriterOptions(fsync=False))
    await ex.open()
    try:
        slices = 0
        real = pe.anyio.lowlevel.checkpoint

        async def cancel_after_first_slice() -> None:
            nonlocal slices
            slices += 1
            if slices == 1:
                scope.cancel()
            await real()

        with anyio.CancelScope() as scope:
            pe.anyio.lowlevel.checkpoint = cancel_after_first_slice  # type: ignore[assignment]
            try:
                first = await ex.persist(snapshot(mem, 1).capture())
            finally:
                pe.anyio.lowlevel.checkpoint = real  # type: ignore[assignment]
        assert slices > 1  # it went on filling after the cancel
        assert not scope.cancelled_caught  # and returned its report, uncut
        add_episode(mem, 2)
        second = await ex.persist(snapshot(mem, 2).capture())
    finally:
        await ex.aclose()
    assert (first.episode_index, second.episode_index) == (1, 2)
    assert second.incremental
    files_match_their_digests(Path(second.path))
    assert load_checkpoint(tmp_path / "ep_000002").memory.to_jsonl() == mem.to_jsonl()


def test_arriving_views_wait_for_each_piece() -> None:
    """A capture whose bytes are still arriving hands each view out only after asking
    for it, in order, whichever way it is read."""
    data = memoryview(b"abcdefghij")
    asked: list[int] = []
    cap = MemoryCapture("id", 3, 14, [data[:4], data[4:8], data[8:]], [8, 12, 14], 3,
                        base=4, arrived=asked.append)
    views = cap.views(9)
    assert len(views) == 2
    assert not asked
    assert [bytes(v) for v in views] == [b"fgh", b"ij"]
    assert asked == [12, 14]
    asked.clear()
    assert bytes(views[-1]) == b"ij"
    assert asked == [14]
    assert b"".join(views) == b"fghij"
    plain = MemoryCapture("id", 3, 14, [data[:4], data[4:8], data[8:]], [8, 12, 14], 3, base=4)
    assert isinstance(plain.views(9), list)


@pytest.mark.anyio
async def test_a_hand_over_ending_in_empty_values_keeps_the_pipe_in_step(tmp_path: Path) -> None:
    """A large hand-over whose last views are empty (an empty bytes state value after a
    big one) announces each byte once: the next commits still find their frames."""
    log, state = MemoryLog(), AgentState()
    state["n"] = 0
    state["big"] = os.urandom(20 * 1024 * 1024)
    state["empty"] = b""
    async with CheckpointWriter(tmp_path, keep_last=3, executor="process") as w:
        for ep in (1, 2, 3):
            log.append(Observation(content=f"o{ep}"))
            state["n"] = ep
            await (await w.submit(Snapshot(ep, ep, "A", log, state=state))).wait()
    ck = load_checkpoint(tmp_path)
    assert ck.state["n"] == 3
    assert ck.state["empty"] == b""
    assert ck.state["big"] == state["big"]
