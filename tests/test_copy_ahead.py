"""The next commit's memory prefix, copied ahead of its snapshot (storage/local_prepare.py).

After a commit the writer copies the memory file it just wrote into a ``.tmp-*`` file,
before it takes the next snapshot (``coalesce``; the writer process does it after every
commit): the next commit renames that copy into place and only appends. The copy
overwrites the memory file of the checkpoint retention deleted last, when nothing else
can see it change: never a file a reader still has open, never one with a second link.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from _fault_util import mounted_tmpfs
from ckptwriter import CheckpointWriter, MemoryLog, load_checkpoint
from ckptwriter.entries import Observation
from conftest import files_match_their_digests, snapshot

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

_MEMORY = "memory_{}.jsonl"


def _grow(mem: MemoryLog, n: int, tag: str) -> None:
    for i in range(n):
        mem.append(Observation(content=f"{tag}-{i}-" + "x" * 200))


def _memory(path: Path, ep: int) -> Path:
    return path / f"ep_{ep:06d}" / _MEMORY.format(ep)


def _leftovers(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("."))


@pytest.mark.parametrize(("executor", "on_backlog", "ahead"), [
    ("process", "coalesce", True), ("process", "block", True),
    ("thread", "coalesce", True), ("thread", "block", False),
])
async def test_each_commit_extends_a_prefix_copied_ahead(
        tmp_path: Path, executor: Any, on_backlog: Any, ahead: bool) -> None:
    mem = MemoryLog()
    _grow(mem, 8000, "a")  # ~1.7 MB: copied ahead from 1 MiB on
    results = []
    async with CheckpointWriter(tmp_path, executor=executor, on_backlog=on_backlog) as w:
        for ep in range(1, 5):
            _grow(mem, 50, f"ep{ep}")
            results.append(await (await w.submit(snapshot(mem, ep))).wait())
    assert [r.incremental for r in results] == [False, True, True, True]
    # The writer process copies ahead after every commit; a worker thread only when
    # the writer waits for it before it takes the next snapshot (coalesce).
    assert [r.prepare_seconds > 0 for r in results] == [False, ahead, ahead, ahead]
    for ep in range(1, 5):
        files_match_their_digests(tmp_path / f"ep_{ep:06d}")
    loaded = load_checkpoint(tmp_path)
    assert loaded.memory.nbytes == mem.nbytes
    assert _memory(tmp_path, 4).read_bytes() == mem.to_jsonl()
    assert [n for n in _leftovers(tmp_path) if n.startswith(".tmp-")] == []


async def test_closing_while_copying_ahead_leaves_nothing_behind(tmp_path: Path) -> None:
    mem = MemoryLog()
    _grow(mem, 200_000, "big")  # ~45 MB: the copy is still going when the writer closes
    async with CheckpointWriter(tmp_path, on_backlog="coalesce") as w:
        await (await w.submit(snapshot(mem, 1))).wait()
        _grow(mem, 10, "more")
        await (await w.submit(snapshot(mem, 2))).wait()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []
    assert _memory(tmp_path, 2).read_bytes() == mem.to_jsonl()


@pytest.mark.parametrize(("executor", "recycled"), [("process", True), ("thread", False)])
async def test_a_deleted_checkpoints_memory_file_is_overwritten_in_place(
        tmp_path: Path, executor: Any, recycled: bool) -> None:
    """The writer process copies over it; a worker thread never does (the lease that
    tests the file would signal the training process if it were broken)."""
    mem = MemoryLog()
    _grow(mem, 8000, "a")
    async with CheckpointWriter(tmp_path, keep_last=2, on_backlog="coalesce",
                                executor=executor) as w:
        for ep in (1, 2):
            _grow(mem, 20, f"ep{ep}")
            await (await w.submit(snapshot(mem, ep))).wait()
        # An O_PATH descriptor keeps the inode (and its number) alive without opening
        # it for reading: nothing that stops the reuse, but a new file cannot get it.
        kept = os.open(_memory(tmp_path, 1), os.O_PATH)
        try:
            for ep in (3, 4):
                _grow(mem, 20, f"ep{ep}")
                await (await w.submit(snapshot(mem, ep))).wait()
            # ep_1 went with ep_3's retention; ep_4 was copied over its memory file.
            assert not (tmp_path / "ep_000001").exists()
            assert (os.stat(_memory(tmp_path, 4)).st_ino == os.fstat(kept).st_ino) \
                is recycled
        finally:
            os.close(kept)
    assert _memory(tmp_path, 4).read_bytes() == mem.to_jsonl()
    files_match_their_digests(tmp_path / "ep_000004")


@pytest.mark.parametrize("holds", ["descriptor", "mapping"])
async def test_a_reader_of_a_deleted_checkpoint_keeps_its_bytes(
        tmp_path: Path, holds: str) -> None:
    mem = MemoryLog()
    _grow(mem, 8000, "a")
    async with CheckpointWriter(tmp_path, keep_last=1, on_backlog="coalesce") as w:
        await (await w.submit(snapshot(mem, 1))).wait()
        # A reader of ep_1: an open descriptor, or a mapping whose descriptor is closed.
        fd = os.open(_memory(tmp_path, 1), os.O_RDONLY)
        # Its identity, held without opening it (as in the test above).
        ident = os.open(_memory(tmp_path, 1), os.O_PATH)
        size = os.fstat(fd).st_size
        want = hashlib.sha256(os.pread(fd, size, 0)).hexdigest()
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        if holds == "mapping":
            os.close(fd)
        try:
            inodes = set()
            for ep in range(2, 6):
                _grow(mem, 20, f"ep{ep}")
                await (await w.submit(snapshot(mem, ep))).wait()
                inodes.add(os.stat(_memory(tmp_path, ep)).st_ino)
            assert not (tmp_path / "ep_000001").exists()
            # Never reused while read (a prefix copy would even keep the bytes it maps:
            # the file would still grow under the reader).
            assert os.fstat(ident).st_ino not in inodes
            assert os.fstat(ident).st_size == size
            assert hashlib.sha256(mapped).hexdigest() == want
            if holds == "descriptor":
                assert hashlib.sha256(os.pread(fd, size + 1, 0)).hexdigest() == want
        finally:
            os.close(ident)
            mapped.close()
            if holds == "descriptor":
                os.close(fd)
    files_match_their_digests(tmp_path / "ep_000005")


async def test_a_memory_file_linked_from_outside_is_never_overwritten(
        tmp_path: Path) -> None:
    ckpts, outside = tmp_path / "ckpts", tmp_path / "outside.jsonl"
    mem = MemoryLog()
    _grow(mem, 8000, "a")
    async with CheckpointWriter(ckpts, keep_last=1, on_backlog="coalesce") as w:
        await (await w.submit(snapshot(mem, 1))).wait()
        os.link(_memory(ckpts, 1), outside)  # a second name, outside the directory
        want = outside.read_bytes()
        for ep in range(2, 6):
            _grow(mem, 20, f"ep{ep}")
            await (await w.submit(snapshot(mem, ep))).wait()
    assert outside.read_bytes() == want
    assert os.stat(outside).st_nlink == 1  # ep_1's name is gone, this one is whole
    files_match_their_digests(ckpts / "ep_000005")


async def test_copies_ahead_left_by_a_crash_are_removed_at_open(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    for name in (".tmp-next-0a1b2c3d", ".tmp-spare-4e5f6a7b"):
        (tmp_path / name).write_bytes(b"half a copy")
    mem = MemoryLog()
    _grow(mem, 10, "a")
    async with CheckpointWriter(tmp_path) as w:
        await (await w.submit(snapshot(mem, 1))).wait()
        assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []


async def test_no_room_to_copy_ahead_costs_nothing_but_the_attempt(tmp_path: Path) -> None:
    """On a full disk the copy ahead fails (and is removed); each commit still commits."""
    mem = MemoryLog()
    _grow(mem, 6000, "a")  # ~1.3 MB per memory file
    with mounted_tmpfs(tmp_path / "mnt", "4m") as mnt:
        async with CheckpointWriter(mnt, keep_last=1, on_backlog="coalesce") as w:
            await (await w.submit(snapshot(mem, 1))).wait()
            for ep in range(2, 5):
                _grow(mem, 20, f"ep{ep}")
                # ep_1 and its copy ahead fill most of the 4 MiB: what does not fit is
                # copied by the commit itself, once retention made room.
                await (await w.submit(snapshot(mem, ep))).wait()
        assert _memory(mnt, 4).read_bytes() == mem.to_jsonl()
        assert [n for n in os.listdir(mnt) if n.startswith(".tmp-")] == []


async def test_a_copy_the_next_commit_does_not_extend_gives_its_space_back_first(
        tmp_path: Path) -> None:
    """The next commit writes another log (nothing to extend): the copy made ahead is
    removed before that commit writes, so its space is there for it."""
    a, b = MemoryLog(), MemoryLog()
    _grow(a, 6000, "a")  # ~1.3 MB each: ep 1, its copy and ep 2 do not fit in 4 MiB
    _grow(b, 6000, "b")
    with mounted_tmpfs(tmp_path / "mnt", "4m") as mnt:
        async with CheckpointWriter(mnt, keep_last=1, on_backlog="coalesce") as w:
            await (await w.submit(snapshot(a, 1))).wait()
            second = await (await w.submit(snapshot(b, 2))).wait()
        assert not second.incremental
        assert _memory(mnt, 2).read_bytes() == b.to_jsonl()
        assert [n for n in os.listdir(mnt) if n.startswith(".tmp-")] == []


async def test_a_forked_child_holds_no_descriptor_of_a_copy_made_ahead(tmp_path: Path) -> None:
    """Thread executor: a worker forked while a copy made ahead exists closes its
    descriptor (it would keep a future checkpoint's memory file open for writing)."""
    mem = MemoryLog()
    _grow(mem, 8000, "a")
    async with CheckpointWriter(tmp_path, executor="thread", on_backlog="coalesce") as w:
        await (await w.submit(snapshot(mem, 1))).wait()
        for _ in range(1000):  # the writer copies ahead once it waits for a snapshot
            copies = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-next-")]
            if copies:
                break
            await anyio.sleep(0.01)
        assert copies
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: which of its descriptors name the copy?
            try:
                os.close(r)
                held = 0
                for fd in os.listdir("/proc/self/fd"):
                    with contextlib.suppress(OSError):  # the listing's own, closed
                        held += ".tmp-next-" in os.readlink(f"/proc/self/fd/{fd}")
                os.write(wfd, str(held).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        os.waitpid(pid, 0)  # noqa: ASYNC222 - the child exits at once
        assert os.read(r, 16) == b"0"
        os.close(r)
        _grow(mem, 20, "ep2")
        assert (await (await w.submit(snapshot(mem, 2))).wait()).prepare_seconds > 0


def _writer_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "ckptwriter.writer_process"],
                         capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("on_backlog", ["block", "coalesce"])
async def test_a_writer_process_killed_between_checkpoints_fails_none(
        tmp_path: Path, on_backlog: Any, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILLed once its copy ahead is done (as the OOM killer may, while it is idle):
    the next checkpoint starts a new writer process and is written; a warning says so."""
    mem = MemoryLog()
    _grow(mem, 8000, "a")
    async with CheckpointWriter(tmp_path, on_backlog=on_backlog) as w:
        await (await w.submit(snapshot(mem, 1))).wait()
        size = _memory(tmp_path, 1).stat().st_size
        for _ in range(1000):  # the copy ahead, whole
            if any(n.startswith(".tmp-next-") and (tmp_path / n).stat().st_size == size
                   for n in os.listdir(tmp_path)):
                break
            await anyio.sleep(0.01)
        (pid,) = _writer_pids()
        os.kill(pid, signal.SIGKILL)
        for _ in range(1000):  # wholly dead: every thread gone, left to be reaped
            # WNOHANG: never waits; WNOWAIT: left for the writer to reap.
            if os.waitid(os.P_PID, pid,  # noqa: ASYNC222
                         os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
            await anyio.sleep(0.01)
        _grow(mem, 20, "ep2")
        result = await (await w.submit(snapshot(mem, 2))).wait()
    assert result.episode_index == 2
    assert "killed by SIGKILL between checkpoints" in caplog.text
    assert _memory(tmp_path, 2).read_bytes() == mem.to_jsonl()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []
