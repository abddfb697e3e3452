"""write_all and write_uncached: every byte, in order, read from its views as it writes
them; the uncached one past the page cache where its buffers allow."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptwriter.storage import posix_io
from ckptwriter.storage.posix_io import Writeback, write_all
from conftest import direct_writes_skip_the_cache, resident_bytes


def _pieces(log: list[str]) -> Iterator[memoryview | bytes]:
    for i in range(40):
        log.append(f"read {i}")
        yield b"" if i % 7 == 0 else (bytes([i]) * (300_000 + i) if i % 2 else
                                      memoryview(bytes([i]) * 500_000)[i:])


@pytest.mark.parametrize("writeback", [False, True])
def test_write_all_writes_every_byte_after_the_current_offset(
    tmp_path: Path, writeback: bool
) -> None:
    """Many batches, empty views, bytes and sliced memoryviews, after a prefix: the file
    is the prefix then the views' bytes, whether each batch's writeback is started."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"prefix")
        write_all(fd, _pieces([]), Writeback(fd, 0, offset=6) if writeback else None)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"prefix" + b"".join(bytes(v) for v in _pieces([]))


def test_write_all_writes_a_batch_before_reading_far_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes still arriving are written a batch at a time, not after the last is read."""
    monkeypatch.setattr(posix_io, "_BATCH_BYTES", 1 << 20)
    log: list[str] = []
    real = posix_io._writev_all

    def writev_all(fd: int, views: list[memoryview]) -> None:
        log.append("write")
        real(fd, views)

    monkeypatch.setattr(posix_io, "_writev_all", writev_all)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        write_all(fd, _pieces(log))
    finally:
        os.close(fd)
    assert log.index("write") < log.index("read 10")
    assert log.count("write") > 5


def _aligned_piece(fill: int, size: int) -> memoryview:
    buf = mmap.mmap(-1, size)
    buf.write(bytes([fill]) * size)
    return memoryview(buf)


def _pieces_direct_then_not() -> list[memoryview | bytes]:
    """Aligned pieces, then one that is not (bytes), then aligned ones again, a short tail."""
    return [*(_aligned_piece(i, 1 << 20) for i in range(1, 10)), b"unaligned" * 1000,
            _aligned_piece(20, 1 << 20), memoryview(_aligned_piece(21, 1 << 20))[:777]]


def test_write_uncached_writes_the_aligned_head_past_the_page_cache(tmp_path: Path) -> None:
    """Every byte lands in order; the aligned head never enters the page cache (read
    back, it is not resident), the rest is an ordinary write, and the fd is left without
    O_DIRECT."""
    import fcntl

    why_not = direct_writes_skip_the_cache(tmp_path)
    if why_not:
        pytest.skip(why_not)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        posix_io.write_uncached(fd, _pieces_direct_then_not(), Writeback(fd, 0))
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        os.fsync(fd)
    finally:
        os.close(fd)
    assert resident_bytes(path) < (9 << 20) // 2, "the aligned head went through the cache"
    assert path.read_bytes() == b"".join(bytes(v) for v in _pieces_direct_then_not())


def _direct_on(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def test_write_uncached_resumes_short_direct_writes_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct writes that write less than asked (near ENOSPC): one ending on a block
    boundary is resumed directly, one that does not is finished the ordinary way; the
    file is every byte in order either way."""
    real = os.writev
    shorts = [1 << 20, 1000]  # the first two direct writes write only this much
    direct_calls = []
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    side = os.open(path, os.O_WRONLY)  # writes the short part as the kernel would

    def short(f: int, views: list[memoryview]) -> int:
        if not _direct_on(f):
            return real(f, views)
        direct_calls.append(sum(len(v) for v in views))
        if not shorts:
            return real(f, views)
        n = shorts.pop(0)
        at = os.lseek(f, 0, os.SEEK_CUR)
        os.pwrite(side, b"".join(bytes(v) for v in _first(views, n)), at)
        os.lseek(f, at + n, os.SEEK_SET)
        return n

    monkeypatch.setattr(os, "writev", short)
    try:
        posix_io.write_uncached(fd, _pieces_direct_then_not())
        assert not _direct_on(fd)
    finally:
        os.close(fd)
        os.close(side)
    assert path.read_bytes() == b"".join(bytes(v) for v in _pieces_direct_then_not())
    # 4 MiB asked, 1 MiB written; the 3 MiB resumed directly, 1000 bytes written; the
    # rest, no longer on a block boundary, refused (EINVAL) and written the usual way.
    assert direct_calls[:3] == [4 << 20, 3 << 20, (3 << 20) - 1000]


def _first(views: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``views``, as views of the same buffers."""
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(v)
    return out


def test_write_uncached_that_fails_leaves_no_o_direct_and_stops_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct write failing (ENOSPC) raises as it is, with O_DIRECT off the fd and
    the views' generator closed then (a hand-over's read-ahead stops with it)."""
    import errno

    real = os.writev
    calls = []

    def full(fd: int, views: list[memoryview]) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, views)

    closed = []

    def source() -> Iterator[memoryview | bytes]:
        try:
            yield from _pieces_direct_then_not()
        finally:
            closed.append(True)

    monkeypatch.setattr(os, "writev", full)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError, match="No space left"):
            posix_io.write_uncached(fd, source())
        assert not _direct_on(fd)
        assert closed == [True]
    finally:
        os.close(fd)


def test_write_uncached_where_direct_writes_are_refused_writes_them_as_usual(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that takes O_DIRECT but refuses its writes (EINVAL: it wants another
    alignment), and one that refuses the flag itself: the same bytes, written normally."""
    import errno
    import fcntl

    real = os.writev

    def picky(fd: int, views: list[memoryview]) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, views)

    monkeypatch.setattr(os, "writev", picky)
    want = b"".join(bytes(v) for v in _pieces_direct_then_not())
    for name, refused in (("einval", False), ("no-flag", True)):
        if refused:
            monkeypatch.setattr(posix_io, "_set_direct", lambda fd, on: False)
        path = tmp_path / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            posix_io.write_uncached(fd, _pieces_direct_then_not())
        finally:
            os.close(fd)
        assert path.read_bytes() == want, name


def test_refill_asks_the_kernel_to_read_back_every_byte_then_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-back after a write past the page cache: WILLNEED requests covering the
    whole file, a read-ahead window at a time, in a thread; then the fd is closed."""
    import threading

    path = tmp_path / "f"
    path.write_bytes(b"z" * (20 * 1024 * 1024 + 5))
    asked: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, at, n, advice: asked.append((fd, at, n, advice)))
    fd = os.open(path, os.O_RDONLY)
    posix_io.refill_in_background([fd])
    for t in threading.enumerate():
        if t.name == "ckptwriter-refill":
            t.join()
    step = 8 * 1024 * 1024
    # Only this fd's requests: a refill of an earlier test may still be running.
    assert [a[1:] for a in asked if a[0] == fd] == \
        [(at, step, os.POSIX_FADV_WILLNEED) for at in (0, step, 2 * step)]
    assert fd not in posix_io._REFILLING
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_a_refill_without_a_thread_is_no_error_and_closes_its_fds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no thread can be started (a limit), the hint is dropped: nothing raises,
    the descriptors are closed."""
    import threading

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    fd = os.open(tmp_path, os.O_RDONLY)
    posix_io.refill_in_background([fd])
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


_FORK_DURING_REFILL = """
import os, sys, threading
from ckptwriter import memory_pieces
from ckptwriter.storage import posix_io
from ckptwriter.memory_pieces import staged_for_direct_write
from ckptwriter.storage.posix_io import DIRECT_MIN_BYTES

started, release = threading.Event(), threading.Event()
def slow(fd, at, n, advice):
    started.set()
    release.wait()
os.posix_fadvise = slow
fd = os.open(sys.argv[1], os.O_RDONLY)
posix_io.refill_in_background([fd])
started.wait()
# A read-ahead of the parent's holds the buffer pool's lock as the fork is made.
held, done = threading.Event(), threading.Event()
def hold():
    with memory_pieces._FREED:
        held.set()
        done.wait()
threading.Thread(target=hold, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    try:
        os.fstat(fd)
        os._exit(3)  # the fork kept the parent's refill descriptor
    except OSError:
        pass
    data = bytes(range(256)) * (DIRECT_MIN_BYTES // 256 + 5000)
    got = b"".join(bytes(v) for v in staged_for_direct_write([data], len(data)))
    os._exit(0 if got == data else 4)
_, status = os.waitpid(pid, 0)
release.set()
done.set()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_fork_during_a_refill_closes_its_copy_and_reads_on_its_own(tmp_path: Path) -> None:
    """A fork made while a refill runs and a read-ahead holds the buffer pool (a
    fork-started worker, say) does not keep the checkpoint's file open, and a large
    full write of its own reads its pieces (no lock of the parent's threads held)."""
    import subprocess
    import sys

    (tmp_path / "f").write_bytes(b"x" * 4096)
    script = tmp_path / "fork.py"
    script.write_text(_FORK_DURING_REFILL)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_copy_prefix_stops_between_chunks_when_asked(tmp_path: Path) -> None:
    """A copy asked to stop leaves off at a chunk boundary and says so; unasked, every
    byte is copied and the offset is at the end, for the delta that follows."""
    data = os.urandom(20 << 20)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        for stop_after, whole in ((2, False), (None, True)):
            dst = os.open(tmp_path / f"dst{stop_after}", os.O_WRONLY | os.O_CREAT, 0o644)
            asked = []

            def stop(stop_after: int | None = stop_after, asked: list[int] = asked) -> bool:
                asked.append(1)
                return stop_after is not None and len(asked) >= stop_after

            try:
                wb = Writeback(dst, len(data))
                done = posix_io.copy_prefix(src, dst, len(data), "src", wb, stop=stop)
                assert done is whole
                copied = os.fstat(dst).st_size
                if whole:
                    assert os.lseek(dst, 0, os.SEEK_CUR) == len(data)
                    wb.settle(lambda: False)
                else:
                    assert 0 < copied < len(data)
                    assert len(asked) == 2
            finally:
                os.close(dst)
            assert (tmp_path / f"dst{stop_after}").read_bytes() == data[:copied]
    finally:
        os.close(src)


def test_settle_waits_for_every_piece_and_stops_when_asked(tmp_path: Path) -> None:
    """settle() asked to stop returns before the first piece, unasked after the last;
    either way the file holds every byte once fsynced."""
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        wb = Writeback(fd, 24 << 20)
        write_all(fd, [os.urandom(24 << 20)], wb)
        wb.settle(lambda: True)
        wb.settle(lambda: False)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.path.getsize(tmp_path / "f") == 24 << 20
