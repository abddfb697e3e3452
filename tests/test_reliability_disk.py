"""Disk and filesystem faults injected for real: a full tmpfs, a read-only mount,
an immutable or unwritable directory, the directory removed, a slow disk."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from _fault_util import (
    SlowStorage,
    build_checkpoints,
    episode_entries,
    fill_disk,
    leftovers,
    memory_until,
    mounted_tmpfs,
    run_child,
    snapshot,
    write_episodes,
)
from ckptwriter import (
    CheckpointWriter,
    MemoryLog,
    StorageError,
    WriterFailedError,
    load_checkpoint,
    verify_checkpoint,
)
from ckptwriter.storage import LocalStorage, PendingCheckpoint

# Each episode appends ~64 KiB, so a few checkpoints fill a 4 MiB tmpfs quickly.
PAD = 64 * 1024


@pytest.fixture
def anyio_backend() -> str:
    """asyncio only: trio is covered by the crash tests; here the executor varies instead."""
    return "asyncio"


@pytest.fixture(params=["process", "thread"])
def executor(request: pytest.FixtureRequest) -> str:
    """Where the writer commits: its own process (the default) or a worker thread."""
    return str(request.param)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs, unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "mnt", "4m") as mnt:
        yield mnt


def _assert_latest_is(root: Path, episode: int, pad: int = 0) -> None:
    loaded = load_checkpoint(root / "latest")
    assert loaded.runtime.episode_index == episode
    assert loaded.memory.to_jsonl() == memory_until(episode, pad).to_jsonl()


ENOSPC_MSG = (
    r"No space left on device while writing checkpoint {root}/ep_000003 \[errno 28\]: "
    r"free disk space or point checkpoint_dir at a larger disk"
)


# -- disk full -------------------------------------------------------------------------


class _HeldRemovals(LocalStorage):
    """Retention's removals in the background wait until a commit asks for the space.

    ``finish_first``: the removal is over before ``settle`` looks (it finished between
    the commit's ENOSPC and its question). ``fail``: the removal frees the space, then
    reports an I/O error (as a later step of it would).
    """

    def __init__(self, root: Path, *, finish_first: bool = False, fail: bool = False) -> None:
        super().__init__(root)
        self.released = threading.Event()
        self.trashed = 0
        self.begun: list[str] = []
        self.finish_first = finish_first
        self.fail = fail

    def begin(self, name: str) -> PendingCheckpoint:
        self.begun.append(name)
        return super().begin(name)

    def delete(self, name: str) -> None:
        super().delete(name)
        self.trashed += 1

    def _remove(self, name: str) -> None:
        if name.startswith(".trash-"):
            assert self.released.wait(60), "nothing asked for the space"
        super()._remove(name)
        if name.startswith(".trash-"):
            if self.fail:
                self.fail = False
                raise OSError(errno.EIO, "injected after the removal")

    def settle(self, *, wait: bool) -> tuple[bool, list[str]]:
        if wait and self.trashed:
            self.released.set()
            if self.finish_first:
                # Over, bookkeeping included, before settle looks: only the count of
                # removals finished since the last settle tells that space was freed.
                deadline = time.monotonic() + 60
                while (self._reaper._todo or self._reaper._busy) and \
                        time.monotonic() < deadline:
                    time.sleep(0.001)
                assert not self._reaper._todo
        return super().settle(wait=wait)


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["held", "finished_first", "failed"])
async def test_commit_out_of_space_waits_for_background_removals(
    small_fs: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit that runs out of space while retention still frees the previous one's
    deletion in the background waits for it and succeeds, with nothing left behind."""
    root = small_fs / "c"
    storage = _HeldRemovals(root, finish_first=case == "finished_first", fail=case == "failed")
    # Each checkpoint holds ~1.5 MiB: two fit the 4 MiB tmpfs, three do not.
    log = MemoryLog()
    log.extend(episode_entries(1, pad=1536 * 1024))
    async with CheckpointWriter(storage=storage, keep_last=1) as w:
        await (await w.submit(snapshot(1, log))).wait()
        log.extend(episode_entries(2))
        r2 = await (await w.submit(snapshot(2, log))).wait()
        assert r2.deleted == ("ep_000001",)
        assert not storage.released.is_set()  # ep 1's files are still on the disk
        log.extend(episode_entries(3))
        r3 = await (await w.submit(snapshot(3, log))).wait()
    assert r3.deleted == ("ep_000002",)
    # The first try of ep 3 ran out of space; the second, once ep 1 was gone, did not.
    assert storage.begun == ["ep_000001", "ep_000002", "ep_000003", "ep_000003"]
    # A failure of that removal (taken while retrying) is reported by ep 3's retention.
    reported = [r.getMessage() for r in caplog.records if "retention" in r.getMessage()]
    if case == "failed":
        assert len(reported) == 1
        assert "error while removing the files of a deleted checkpoint" in reported[0]
        assert ".trash-ep_000001-" in reported[0]
    else:
        assert reported == []
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("ep_")) == ["ep_000003"]
    assert leftovers(root) == []
    verify_checkpoint(root / "ep_000003")


@pytest.mark.anyio
async def test_removal_failure_taken_by_a_failed_retry_is_logged_at_close(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A removal failure the out-of-space retry took, in a commit that then failed for
    good (ep 3 never fits), is not lost: closing the writer logs it."""
    storage = _HeldRemovals(small_fs / "c", fail=True)
    log = MemoryLog()
    log.extend(episode_entries(1, pad=1536 * 1024))
    async with CheckpointWriter(storage=storage, keep_last=1, on_error="warn") as w:
        await (await w.submit(snapshot(1, log))).wait()
        log.extend(episode_entries(2))
        await (await w.submit(snapshot(2, log))).wait()
        log.extend(episode_entries(3, pad=3 * 1024 * 1024))
        with pytest.raises(WriterFailedError, match="No space left on device"):
            await (await w.submit(snapshot(3, log))).wait()
    assert storage.begun[-2:] == ["ep_000003", "ep_000003"]  # it did retry
    logged = [r.getMessage() for r in caplog.records
              if "removing the files of a deleted checkpoint" in r.getMessage()]
    assert len(logged) == 1
    assert ".trash-ep_000001-" in logged[0]
    assert "the next writer to open the directory removes them" in logged[0]


@pytest.mark.anyio
async def test_disk_full_reports_enospc_with_path(small_fs: Path, executor: str) -> None:
    """A full disk fails the checkpoint with ENOSPC and the checkpoint's path."""
    root = small_fs / "c"
    log = memory_until(2, PAD)
    async with CheckpointWriter(root, on_error="warn", executor=executor) as w:
        await (await w.submit(snapshot(2, log))).wait()
        fill_disk(small_fs, leave=32 * 1024)
        log.extend(episode_entries(3, PAD))
        h = await w.submit(snapshot(3, log))
        msg = r"^checkpoint for episode 3 was not written: " + ENOSPC_MSG.format(root=root)
        with pytest.raises(WriterFailedError, match=msg):
            await h.wait()


@pytest.mark.anyio
async def test_disk_full_keeps_previous_and_latest(small_fs: Path, executor: str) -> None:
    """After ENOSPC, the previous checkpoint and latest are intact and no temp dir is left."""
    root = small_fs / "c"
    log = memory_until(2, PAD)
    async with CheckpointWriter(root, on_error="warn", executor=executor) as w:
        await w.submit(snapshot(2, log))
        await w.flush()
        fill_disk(small_fs, leave=32 * 1024)
        log.extend(episode_entries(3, PAD))
        await w.submit(snapshot(3, log))
        await w.flush()
        assert w.stats.failed == 1
    assert leftovers(root) == []
    assert sorted(os.listdir(root)) == [".lock", "ep_000002", "latest", "latest.json"]
    _assert_latest_is(root, 2, PAD)


@pytest.mark.anyio
async def test_disk_full_warn_continues_and_recovers(small_fs: Path, executor: str) -> None:
    """With on_error="warn", training goes on; the next checkpoint succeeds once space is freed."""
    root = small_fs / "c"
    log = memory_until(2, PAD)
    async with CheckpointWriter(root, on_error="warn", executor=executor) as w:
        await w.submit(snapshot(2, log))
        await w.flush()
        filler = fill_disk(small_fs, leave=32 * 1024)
        log.extend(episode_entries(3, PAD))
        await w.submit(snapshot(3, log))
        await w.flush()
        filler.unlink()
        log.extend(episode_entries(4, PAD))
        result = await (await w.submit(snapshot(4, log))).wait()
        assert (w.stats.written, w.stats.failed) == (2, 1)
    assert result.name == "ep_000004"
    _assert_latest_is(root, 4, PAD)


async def _fill_then_submit(root: Path, mnt: Path, then: str, executor: str) -> None:
    log = memory_until(2, PAD)
    async with CheckpointWriter(root, on_error="raise", executor=executor) as w:
        await (await w.submit(snapshot(2, log))).wait()
        fill_disk(mnt, leave=32 * 1024)
        log.extend(episode_entries(3, PAD))
        h = await w.submit(snapshot(3, log))
        with contextlib.suppress(WriterFailedError):
            await h.wait()
        log.extend(episode_entries(4, PAD))
        if then == "submit":
            await w.submit(snapshot(4, log))
        elif then == "flush":
            await w.flush()


@pytest.mark.anyio
@pytest.mark.parametrize("then", ["submit", "flush", "exit"])
async def test_disk_full_raise_stops_on_next_call(
    small_fs: Path, then: str, executor: str
) -> None:
    """With on_error="raise", the next submit, flush or writer exit raises WriterFailedError."""
    root = small_fs / "c"
    msg = r"^checkpoint for episode 3 failed: " + ENOSPC_MSG.format(root=root)
    with pytest.raises(WriterFailedError, match=msg):
        await _fill_then_submit(root, small_fs, then, executor)
    _assert_latest_is(root, 2, PAD)


@pytest.mark.anyio
async def test_disk_full_at_every_size_leaves_no_temp(small_fs: Path, tmp_path: Path) -> None:
    """Wherever the disk fills up (commit or pointer update), no temp entry is left behind."""
    pristine, root = tmp_path / "pristine", small_fs / "c"
    await write_episodes(pristine, range(1, 2), pad=PAD)
    seen: list[str] = []
    # Free space from nothing to enough, one 4 KiB tmpfs page at a time: ENOSPC lands in
    # the memory file, agent.json, runtime.json and the latest.json temp file in turn.
    for pages in range(0, 64):
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root, symlinks=True)
        filler = fill_disk(small_fs, leave=pages * 4096)
        # A thread: 40 writer processes would cost seconds; the commit code is the same.
        async with CheckpointWriter(root, on_error="warn", executor="thread") as w:
            h = await w.submit(snapshot(2, memory_until(2, PAD)))
            try:
                await h.wait()
                seen.append("ok")
            except WriterFailedError as exc:
                seen.append("commit" if "writing checkpoint" in str(exc) else "pointer")
        filler.unlink()
        assert leftovers(root) == [], (pages, seen[-1])
        assert load_checkpoint(root / "latest").runtime.episode_index in (1, 2)
        if seen[-1] == "ok":
            break
    print(seen)
    assert seen[0] == "commit"
    assert seen[-1] == "ok"


# -- permissions, read-only, directory removed -----------------------------------------


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths added to the list get `chattr +i` removed again at teardown."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        subprocess.run(["chattr", "-i", str(p)], check=False)


def _chattr_immutable(p: Path, undo: list[Path]) -> None:
    res = subprocess.run(["chattr", "+i", str(p)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"chattr +i not supported on {p}'s filesystem: {res.stderr.strip()}")
    undo.append(p)


def _chattr_mutable(p: Path) -> None:
    subprocess.run(["chattr", "-i", str(p)], check=True)


@pytest.mark.anyio
async def test_immutable_dir_mid_run_is_a_clear_error(
    tmp_path: Path, immutable: list[Path], executor: str) -> None:
    """An immutable checkpoints dir (EPERM, even for root) fails the checkpoint, keeps the rest."""
    root = tmp_path / "c"
    log = memory_until(1)
    async with CheckpointWriter(root, on_error="warn", executor=executor) as w:
        await (await w.submit(snapshot(1, log))).wait()
        _chattr_immutable(root, immutable)
        log.extend(episode_entries(2))
        h = await w.submit(snapshot(2, log))
        with pytest.raises(WriterFailedError, match=(
            rf"^checkpoint for episode 2 was not written: Operation not permitted while "
            rf"writing checkpoint {root}/ep_000002 \[errno 1\]: check the directory's permissions$"
        )):
            await h.wait()
        _chattr_mutable(root)
        log.extend(episode_entries(3))
        await (await w.submit(snapshot(3, log))).wait()
    assert leftovers(root) == []
    _assert_latest_is(root, 3)
    verify_checkpoint(root / "ep_000001")


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the unprivileged user `nobody` can reach (tmp_path's parents are 0700)."""
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no `nobody` user to run the permission check as")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to `nobody`; as non-root use the chattr tests")
    d = Path(tempfile.mkdtemp(prefix="ckptwriter-perm-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(root: Path, phase: str) -> dict[str, str]:
    res = run_child("as-nobody", str(root), phase)
    assert res.returncode == 3, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def test_permission_denied_at_start_names_the_lock_file(nobody_dir: Path) -> None:
    """A writer without write permission on the checkpoints dir fails at start with EACCES."""
    root = nobody_dir / "c"
    build_checkpoints(root, 1)
    os.chmod(root, 0o755)  # root owns it: nobody may read, not write
    out = _as_nobody(root, "start")
    assert out["error"] == "StorageError"
    assert out["message"] == (
        f"Permission denied while creating the lock file {root}/.lock [errno 13]: "
        "check the directory's permissions"
    )
    _assert_latest_is(root, 1)


def test_permission_denied_mid_run_keeps_earlier(nobody_dir: Path) -> None:
    """Losing write permission mid-run fails the next checkpoint with EACCES; ep 1 stays."""
    root = nobody_dir / "c"
    root.mkdir()
    os.chown(root, 65534, 65534)
    out = _as_nobody(root, "midrun")
    assert out["error"] == "WriterFailedError"
    assert out["message"] == (
        f"checkpoint for episode 2 failed: Permission denied while writing checkpoint "
        f"{root}/ep_000002 [errno 13]: check the directory's permissions"
    )
    assert leftovers(root) == []
    _assert_latest_is(root, 1)


@contextlib.contextmanager
def _read_only_bind(path: Path) -> Iterator[None]:
    """Make ``path`` a read-only bind mount of itself (files already open stay writable)."""
    res = subprocess.run(["mount", "--bind", str(path), str(path)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.anyio
async def test_read_only_filesystem_mid_run_is_a_clear_error(
    tmp_path: Path, executor: str
) -> None:
    """A filesystem that turns read-only mid-run fails the checkpoint with EROFS; ep 1 stays."""
    root = tmp_path / "c"
    log = memory_until(1)
    async with CheckpointWriter(root, on_error="warn", executor=executor) as w:
        await (await w.submit(snapshot(1, log))).wait()
        with _read_only_bind(root):
            log.extend(episode_entries(2))
            h = await w.submit(snapshot(2, log))
            with pytest.raises(WriterFailedError, match=(
                rf"^checkpoint for episode 2 was not written: Read-only file system while "
                rf"writing checkpoint {root}/ep_000002 \[errno 30\]: the filesystem is "
                r"read-only; point checkpoint_dir at a writable disk$"
            )):
                await h.wait()
            _assert_latest_is(root, 1)
    assert leftovers(root) == []


@pytest.mark.anyio
async def test_read_only_filesystem_at_start_is_a_clear_error(
    tmp_path: Path, executor: str
) -> None:
    """Starting a writer on a read-only filesystem raises StorageError naming the lock file."""
    root = tmp_path / "c"
    await write_episodes(root, range(1, 2))
    with _read_only_bind(root):
        with pytest.raises(StorageError, match=(
            rf"^Read-only file system while creating the lock file {root}/\.lock \[errno 30\]: "
            r"the filesystem is read-only; point checkpoint_dir at a writable disk$"
        )):
            async with CheckpointWriter(root, executor=executor):
                pass
        _assert_latest_is(root, 1)


def test_resume_from_read_only_filesystem(tmp_path: Path) -> None:
    """Checkpoints on a read-only filesystem (an archive) can still be loaded."""
    root = tmp_path / "c"
    build_checkpoints(root, 2)
    with _read_only_bind(root):
        _assert_latest_is(root, 2)


@pytest.mark.anyio
async def test_checkpoint_dir_removed_mid_run_is_a_clear_error(
    tmp_path: Path, executor: str
) -> None:
    """Removing the checkpoints dir under a running writer gives ENOENT with a clear hint."""
    root = tmp_path / "c"
    log = memory_until(1)
    async with CheckpointWriter(root, on_error="warn", executor=executor) as w:
        await (await w.submit(snapshot(1, log))).wait()
        shutil.rmtree(root)
        log.extend(episode_entries(2))
        h = await w.submit(snapshot(2, log))
        with pytest.raises(WriterFailedError, match=(
            rf"^checkpoint for episode 2 was not written: No such file or directory while "
            rf"writing checkpoint {root}/ep_000002 \[errno 2\]: the checkpoints directory "
            r"was removed while the run was going$"
        )):
            await h.wait()


@pytest.mark.anyio
async def test_checkpoint_dir_moved_away_keeps_earlier(tmp_path: Path, executor: str) -> None:
    """A checkpoints dir moved away mid-run keeps its checkpoints intact; the writer errors."""
    root, moved = tmp_path / "c", tmp_path / "moved"
    log = memory_until(2)
    async with CheckpointWriter(root, on_error="warn", executor=executor) as w:
        await w.submit(snapshot(1, memory_until(1)))
        await (await w.submit(snapshot(2, log))).wait()
        os.rename(root, moved)
        log.extend(episode_entries(3))
        await w.submit(snapshot(3, log))
        await w.flush()
        assert (w.stats.written, w.stats.failed) == (2, 1)
    _assert_latest_is(moved, 2)
    verify_checkpoint(moved / "ep_000001")


# -- slow disk -------------------------------------------------------------------------

SLOW = 0.03


@pytest.mark.anyio
async def test_slow_disk_block_loses_nothing_and_bounds_pending(tmp_path: Path) -> None:
    """Slow disk, on_backlog="block": stalls counted, pending bounded, every episode saved."""
    root = tmp_path / "c"
    log = memory_until(0)
    max_pending_seen = 0
    async with CheckpointWriter(storage=SlowStorage(root, delay=SLOW), max_pending=2) as w:
        for ep in range(1, 13):
            log.extend(episode_entries(ep))
            await w.submit(snapshot(ep, log))
            max_pending_seen = max(max_pending_seen, w.stats.pending)
            await anyio.sleep(0.002)  # the loop's own work between episodes
        await w.flush()
        stats = w.stats
    assert stats.stalls > 0
    assert stats.stall_seconds > 0
    assert max_pending_seen <= 2 + 1  # queue + the one being written
    assert (stats.written, stats.coalesced, stats.failed) == (12, 0, 0)
    assert sorted(n for n in os.listdir(root) if n.startswith("ep_")) == [
        f"ep_{i:06d}" for i in range(1, 13)
    ]
    _assert_latest_is(root, 12)


@pytest.mark.anyio
async def test_slow_disk_coalesce_keeps_loop_pace(tmp_path: Path) -> None:
    """A slow disk under on_backlog="coalesce": submit never waits, coalesced counted, last kept."""
    root = tmp_path / "c"
    log = memory_until(0)
    handles = []
    async with CheckpointWriter(
        storage=SlowStorage(root, delay=SLOW), max_pending=1, on_backlog="coalesce"
    ) as w:
        for ep in range(1, 13):
            log.extend(episode_entries(ep))
            handles.append(await w.submit(snapshot(ep, log)))
            assert w.stats.pending <= 1 + 1
            await anyio.sleep(0.002)
        results = [await h.wait() for h in handles]
        stats = w.stats
    assert stats.stalls == 0
    assert stats.coalesced > 0
    assert stats.written + stats.coalesced == stats.submitted == 12
    assert stats.loop_seconds_max < SLOW / 3
    assert results[-1].episode_index == 12
    assert all(r.episode_index >= h.episode_index for r, h in zip(results, handles, strict=True))
    _assert_latest_is(root, 12)


# -- what `ckptwriter train` does when the disk fills up -------------------------------


def _train_on(mnt: Path, tmp_path: Path, on_error: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / f"{on_error}.yaml"
    cfg.write_text(f"run_name: full\noutput_dir: {mnt}/outputs\nruntime:\n"
                   "  max_envs_to_visit: 600\n  checkpoint_dir: checkpoints\n"
                   f"  checkpoint_every_episodes: 1\n  on_error: {on_error}\n")
    return subprocess.run([sys.executable, "-m", "ckptwriter", "train", "--config", str(cfg),
                           "-q"], capture_output=True, text=True, check=False, timeout=120)


def test_cli_disk_full_raise_stops_with_clear_error(small_fs: Path, tmp_path: Path) -> None:
    """`ckptwriter train` filling its disk (on_error: raise) exits 1 with the ENOSPC message."""
    res = _train_on(small_fs, tmp_path, "raise")
    assert res.returncode == 1, res.stderr
    # The error, then where to continue from (issue 10: every failure exit says so).
    error, last = res.stderr.strip().splitlines()[-2:]
    assert re.match(r"^error: checkpoint for episode \d+ (failed|was not written): No space left "
                    r"on device while "
                    r"writing checkpoint .*/checkpoints/ep_\d{6} \[errno 28\]: free disk space",
                    error), error
    assert re.match(r"^the last durable checkpoint is .*/checkpoints/ep_\d{6}; to continue from "
                    r"it, set runtime\.resume_from: ", last), last
    assert "Traceback" not in res.stderr
    ckpts = next((small_fs / "outputs" / "full").iterdir()) / "checkpoints"
    assert leftovers(ckpts) == []
    assert load_checkpoint(ckpts / "latest").runtime.episode_index > 0


def test_cli_disk_full_warn_trains_to_the_end(small_fs: Path, tmp_path: Path) -> None:
    """With on_error: warn the run finishes (exit 0), warns per failed checkpoint, latest valid."""
    res = _train_on(small_fs, tmp_path, "warn")
    assert res.returncode == 0, res.stderr
    assert "Finished at episode 600/600" in res.stdout
    # Logged once, by the writer (issue 12: not again by the runtime).
    assert re.search(r"checkpoint for episode \d+ failed: .*No space left on device", res.stderr)
    ckpts = next((small_fs / "outputs" / "full").iterdir()) / "checkpoints"
    assert leftovers(ckpts) == []
    verify_checkpoint(ckpts / "latest")
