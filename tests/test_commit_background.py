"""Work taken off the commit's critical path: flushes batched, writeback started while
a file is filled, retention's removals in the background, the next latest.json staged.

Each keeps the protocol's promise: nothing appears before every byte of it is durable,
and a failure of any of it is reported, never lost.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from _fault_util import episode_entries, leftovers, memory_until, record_protocol, snapshot
from ckptwriter import (
    AgentState,
    CheckpointWriter,
    MemoryLog,
    Observation,
    Snapshot,
    WriterFailedError,
    load_checkpoint,
    verify_checkpoint,
)
from ckptwriter.storage import local as local_mod
from ckptwriter.storage import posix_io

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _fd_name(fd: int) -> str:
    return Path(os.readlink(f"/proc/self/fd/{fd}")).name


async def test_linking_shared_files_while_removals_run_beside_it(tmp_path: Path) -> None:
    """Retention unlinks names of shared inodes in the background while the next commit
    checks and links the same inodes: every commit links, none fails or copies."""
    mem, state = MemoryLog(), AgentState()
    for k in range(8):
        state[f"k{k}"] = {"v": list(range(100 * k))}
    results = []
    async with CheckpointWriter(tmp_path, keep_last=1, executor="thread", fsync=False) as w:
        for ep in range(1, 121):
            mem.append(Observation(content=f"o{ep}"))
            state["step"] = ep
            results.append(await (await w.submit(Snapshot(ep, ep, "A", mem, state=state))).wait())
    assert [r.episode_index for r in results] == list(range(1, 121))
    # The 8 unchanged keys, every time after the first.
    assert min(r.files_linked for r in results[1:]) >= 8
    assert leftovers(tmp_path) == []
    ck = load_checkpoint(tmp_path)
    assert ck.state["k7"] == {"v": list(range(700))}
    assert ck.state["step"] == 120
    assert (tmp_path / "ep_000120" / "state.k7.json").stat().st_nlink == 1


async def test_writeback_starts_as_the_memory_file_is_filled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy and append each start the kernel's writeback of what they filled, in order,
    a megabyte or more at a time; the file is still byte for byte the memory."""
    calls: dict[str, list[tuple[int, int]]] = {}

    def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> int:
        assert flags == 2  # SYNC_FILE_RANGE_WRITE: start it, never wait
        calls.setdefault(_fd_name(fd), []).append((offset, nbytes))
        return 0

    monkeypatch.setattr(posix_io, "_sync_file_range", lambda: sync_file_range)
    log = MemoryLog()
    for i in range(5):
        log.append(Observation(content=f"{i}" + "x" * (1 << 20)))
    async with CheckpointWriter(tmp_path, executor="thread") as w:
        await (await w.submit(Snapshot(1, 1, "A", log))).wait()
        for i in range(3):
            log.append(Observation(content=f"more {i}" + "y" * (1 << 20)))
        r = await (await w.submit(Snapshot(2, 2, "A", log))).wait()
    assert r.incremental
    for name, size in (("memory_1.jsonl", 5), ("memory_2.jsonl", 8)):
        ranges = calls[name]
        # Contiguous from 0, each at least a megabyte, covering all but the last one.
        assert [o for o, _ in ranges] == [sum(n for _, n in ranges[:i]) for i in range(len(ranges))]
        assert all(n >= posix_io.WRITEBACK_CHUNK for _, n in ranges)
        assert sum(n for _, n in ranges) > (size - 1) << 20
    assert "runtime.json" not in calls  # small files: the fsync alone
    loaded = load_checkpoint(tmp_path)
    assert loaded.memory.to_jsonl() == log.to_jsonl()


async def test_writeback_refused_is_only_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the call is refused, it is not tried again for that file, and the commit
    (still fsynced) goes on."""
    calls: list[int] = []

    def refused(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append(offset)
        return -1

    monkeypatch.setattr(posix_io, "_sync_file_range", lambda: refused)
    log = MemoryLog()
    for i in range(4):
        log.append(Observation(content=f"{i}" + "x" * (1 << 20)))
    async with CheckpointWriter(tmp_path, executor="thread") as w:
        await (await w.submit(Snapshot(1, 1, "A", log))).wait()
    assert calls == [0]
    verify_checkpoint(tmp_path / "ep_000001")


async def test_latest_json_is_durable_before_the_checkpoint_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next latest.json is written and fsynced with the checkpoint's files, and only
    renamed over latest.json after the checkpoint's rename and the latest symlink."""
    recorded = record_protocol(monkeypatch)
    async with CheckpointWriter(tmp_path, executor="thread") as w:
        await (await w.submit(snapshot(1, memory_until(1)))).wait()
    events = [(k, Path(v).name if k == "fsync" else v) for k, v in recorded]
    i_rename = next(i for i, (k, v) in enumerate(events)
                    if k == "rename" and v.endswith("-> ep_000001"))
    staged = [v for k, v in events[:i_rename] if k == "fsync" and v.startswith(".tmp-latest.json-")]
    assert len(staged) == 1
    i_link = next(i for i, (k, v) in enumerate(events)
                  if k == "replace" and v.endswith("-> latest"))
    i_json = events.index(("replace", f"{staged[0]} -> latest.json"))
    assert i_rename < i_link < i_json
    assert ("fsync", tmp_path.name) in events[i_json:]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("victim", ["runtime.json", "memory_2.jsonl", ".tmp-latest.json-"])
async def test_a_failed_flush_in_the_batch_fails_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str
) -> None:
    """An fsync that fails (EIO) among the batched ones: the checkpoint never appears,
    latest stays, nothing is left behind, and the next commit succeeds."""
    real_fsync = os.fsync
    armed = [True]

    def fsync(fd: int) -> None:
        # Armed after ep 1: the first such file is ep 2's.
        if armed[0] and _fd_name(fd).startswith(victim):
            armed[0] = False
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    log = memory_until(1)
    async with CheckpointWriter(tmp_path, executor="thread", on_error="warn") as w:
        await (await w.submit(snapshot(1, log))).wait()
        monkeypatch.setattr(os, "fsync", fsync)
        log.extend(episode_entries(2))
        with pytest.raises(WriterFailedError, match=r"Input/output error while writing "
                                                    r"checkpoint .*ep_000002"):
            await (await w.submit(snapshot(2, log))).wait()
        assert not armed[0]
        assert not (tmp_path / "ep_000002").exists()
        assert os.readlink(tmp_path / "latest") == "ep_000001"
        assert [n for n in leftovers(tmp_path) if n.startswith(".tmp-")] == []
        log.extend(episode_entries(3))
        await (await w.submit(snapshot(3, log))).wait()
    assert load_checkpoint(tmp_path).runtime.episode_index == 3
    assert leftovers(tmp_path) == []


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    import subprocess

    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(__import__("shutil").which("fincore") is None,
                    reason="fincore (util-linux) is not installed")
async def test_previous_memory_file_leaves_the_page_cache_once_copied(tmp_path: Path) -> None:
    """The writer gives back the pages of a memory file it has copied from: the page
    cache holds the newest file (the next copy's source), not every checkpoint kept."""
    log = MemoryLog()
    for i in range(4):
        log.append(Observation(content=f"{i}" + "x" * (1 << 20)))
    async with CheckpointWriter(tmp_path, executor="thread") as w:
        await (await w.submit(Snapshot(1, 1, "A", log))).wait()
        first = tmp_path / "ep_000001" / "memory_1.jsonl"
        assert _resident(first) > 0  # just written
        log.append(Observation(content="more"))
        r = await (await w.submit(Snapshot(2, 2, "A", log))).wait()
    assert r.incremental
    assert _resident(first) == 0
    assert _resident(tmp_path / "ep_000002" / "memory_2.jsonl") > 0
    verify_checkpoint(tmp_path / "ep_000001")


def _exit_code_within(pid: int, seconds: float) -> int | None:
    """The child's exit code, or None (and the child killed) if it runs that long."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


async def test_a_forked_child_does_not_wait_for_the_parents_removals(tmp_path: Path) -> None:
    """A child forked while a deleted checkpoint is still being removed (the thread
    executor runs in the training process) neither waits for nor repeats that removal:
    its settle() and close() return at once; the parent's removal goes on."""
    import threading

    from ckptwriter.storage import LocalStorage

    release = threading.Event()

    class HeldRemovals(LocalStorage):
        def _remove(self, name: str) -> None:
            if name.startswith(".trash-"):
                release.wait(60)
            super()._remove(name)

    storage = HeldRemovals(tmp_path)
    log = MemoryLog()
    async with CheckpointWriter(storage=storage, keep_last=1) as w:
        for ep in (1, 2):
            log.append(Observation(content=f"o{ep}"))
            await (await w.submit(Snapshot(ep, ep, "A", log))).wait()
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            code = 1
            try:
                storage.settle(wait=True)
                storage.close()
                code = 0
            finally:
                os._exit(code)
        code = _exit_code_within(pid, 20)
        release.set()
        assert code is not None, "the forked child waited for its parent's removal"
        assert code == 0
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.glob("ep_*")) == ["ep_000002"]


async def test_a_removal_that_raises_anything_is_reported_and_the_next_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A background removal that raises something other than an OSError (SystemExit
    here) is reported by the next commit; later removals still run, close returns."""
    from ckptwriter.storage import LocalStorage

    class ExitOnce(LocalStorage):
        done = False

        def _remove(self, name: str) -> None:
            if name.startswith(".trash-") and not self.done:
                self.done = True
                raise SystemExit(3)
            super()._remove(name)

    log = MemoryLog()
    async with CheckpointWriter(storage=ExitOnce(tmp_path), keep_last=1, on_error="warn") as w:
        for ep in range(1, 6):
            log.append(Observation(content=f"o{ep}"))
            await (await w.submit(Snapshot(ep, ep, "A", log))).wait()
        stats = w.stats
    assert stats.retention_errors == 1
    msg = next(r.getMessage() for r in caplog.records if "retention" in r.getMessage())
    assert "SystemExit(3) while removing the files of a deleted checkpoint" in msg
    assert sorted(p.name for p in tmp_path.glob("ep_*")) == ["ep_000005"]
    # ep 1's files were never removed: the next start does it.
    assert [n for n in leftovers(tmp_path) if n.startswith(".trash-ep_000001-")]
    async with CheckpointWriter(tmp_path, keep_last=1, executor="thread"):
        assert leftovers(tmp_path) == []


async def test_without_posix_fadvise_commits_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where os has no posix_fadvise (macOS), giving pages back is skipped, nothing else."""
    monkeypatch.delattr(os, "posix_fadvise")
    log = MemoryLog()
    async with CheckpointWriter(tmp_path, executor="thread") as w:
        for ep in (1, 2, 3):
            log.append(Observation(content=f"o{ep}" + "x" * 100_000))
            r = await (await w.submit(Snapshot(ep, ep, "A", log))).wait()
    assert r.incremental
    verify_checkpoint(tmp_path / "ep_000003")


def test_a_forked_child_leaves_the_parents_staged_latest_json(tmp_path: Path) -> None:
    """A child forked between a checkpoint's finalize and its pointer move that closes
    its copy of the storage leaves the staged latest.json to the parent, whose pointer
    move then succeeds."""
    from ckptwriter.storage import FileSpec, LocalStorage

    storage = LocalStorage(tmp_path)
    storage.open(lambda path: True)
    try:
        pending = storage.begin("ep_000001")
        pending.write([FileSpec("memory_1.jsonl", [b"{}\n"])])
        doc = b'{"checkpoint": "ep_000001"}'
        pending.finalize(b"{}", latest=doc)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                storage.close()
                code = 0
            finally:
                os._exit(code)
        assert _exit_code_within(pid, 60) == 0
        storage.replace_pointer("ep_000001", doc)
    finally:
        storage.close()
    assert (tmp_path / "latest.json").read_bytes() == doc
    assert os.readlink(tmp_path / "latest") == "ep_000001"
    assert leftovers(tmp_path) == []


async def test_many_files_keep_the_memory_files_flush_for_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more files than a batch holds open (40 state keys), each file past that is
    flushed as it is written, the memory file's flush waits until all are written, and
    every one of them is flushed before the checkpoint's rename."""
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(f"fsync {_fd_name(fd)}")
        real_fsync(fd)

    def rename(src: str, dst: str, **kw: int) -> None:
        events.append(f"rename {dst}")
        real_rename(src, dst, **kw)

    log, state = MemoryLog(), AgentState()
    log.append(Observation(content="x" * 100_000))
    for k in range(40):
        state[f"k{k:02d}"] = k
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(local_mod.os, "rename", rename)
    async with CheckpointWriter(tmp_path, executor="thread") as w:
        await (await w.submit(Snapshot(1, 1, "A", log, state=state))).wait()
    i_rename = events.index("rename ep_000001")
    flushed = [e.removeprefix("fsync ") for e in events[:i_rename] if e.startswith("fsync")]
    assert {f"state.k{k:02d}.json" for k in range(40)} | {"memory_1.jsonl", "runtime.json"} \
        <= set(flushed)
    assert flushed.index("memory_1.jsonl") > flushed.index("state.k39.json")
    verify_checkpoint(tmp_path / "ep_000001")
