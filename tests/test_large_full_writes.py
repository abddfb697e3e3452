"""A large full write with the thread executor: past the page cache where it can be.

The writer process's side (bytes read from the training process into page-aligned
buffers) is in test_memory_pull.py; how ``write_uncached`` writes, in test_posix_io.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptwriter import CheckpointWriter, MemoryLog, load_checkpoint
from ckptwriter.storage import local_pending, posix_io
from ckptwriter.storage.posix_io import DIRECT_MIN_BYTES
from conftest import (
    add_episode,
    big_memory,
    direct_writes_skip_the_cache,
    files_match_their_digests,
    snapshot,
)


@pytest.fixture(scope="module")
def large() -> MemoryLog:
    return big_memory((DIRECT_MIN_BYTES >> 20) + 8)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("fsync", [True, False])
@pytest.mark.anyio
async def test_a_thread_executors_large_full_write_goes_past_the_page_cache_with_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, large: MemoryLog, fsync: bool
) -> None:
    """With fsync on, the memory file of a full checkpoint over DIRECT_MIN_BYTES is
    written with O_DIRECT (all but its unaligned tail) from page-aligned pieces, then
    read back (without fsync, as it always was); the incremental one after it is not;
    every file is byte-exact either way."""
    direct: list[int] = []
    real_direct = posix_io._direct

    def counting(fd: int, views: list[memoryview], wb: object) -> list[memoryview]:
        asked = sum(len(v) for v in views)
        left = real_direct(fd, views, wb)  # type: ignore[arg-type]
        direct.append(asked - sum(len(v) for v in left))
        return left

    refills: list[int] = []
    real_refill = local_pending.refill_in_background

    def recording(fds: list[int]) -> None:
        refills.append(len(fds))
        real_refill(fds)

    monkeypatch.setattr(posix_io, "_direct", counting)
    monkeypatch.setattr(local_pending, "refill_in_background", recording)
    mem = MemoryLog()
    mem.extend(large[:])
    async with CheckpointWriter(tmp_path, executor="thread", fsync=fsync) as w:
        r1 = await (await w.submit(snapshot(mem, 1))).wait()
        add_episode(mem, 2)
        r2 = await (await w.submit(snapshot(mem, 2))).wait()
    assert (r1.incremental, r2.incremental) == (False, True)
    size = Path(r1.path, "memory_1.jsonl").stat().st_size
    if not fsync:
        assert (direct, refills) == ([], [0, 0])
    elif hasattr(os, "O_DIRECT"):
        assert refills == [1, 0]
        # All but the unaligned tail, where the filesystem takes direct writes.
        if direct_writes_skip_the_cache(tmp_path) is None:
            assert size - 2 * 1024 * 1024 < sum(direct) <= size
    for r in (r1, r2):
        files_match_their_digests(Path(r.path))
    assert load_checkpoint(tmp_path / "latest").memory.to_jsonl() == mem.to_jsonl()
