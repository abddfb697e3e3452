"""write_all: every byte, in order, read from its views as it writes them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptwriter.storage import posix_io
from ckptwriter.storage.posix_io import Writeback, write_all


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
