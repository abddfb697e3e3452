"""The local backend (storage/local.py): what it opens at start-up, and what it never follows."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptwriter import CheckpointWriter, StorageError

pytestmark = pytest.mark.anyio

EXECUTORS = [pytest.param("thread", id="thread"), pytest.param("process", id="process")]


@pytest.fixture
def anyio_backend() -> str:
    """One event loop is enough: what is refused is decided in the backend."""
    return "asyncio"


def _symlink(lock: Path, outside: Path) -> None:
    lock.symlink_to(outside)


def _hard_link(lock: Path, outside: Path) -> None:
    os.link(outside, lock)


def _unsafe(lock: Path, found: str) -> str:
    return (rf"^the lock file {re.escape(str(lock))} {re.escape(found)}, expected a regular "
            r"file the writer created; it is never followed or written: remove it \(and "
            r"check who put it there\), then start again$")


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize(("plant", "found"), [
    pytest.param(_symlink, "is a symlink", id="symlink"),
    pytest.param(_hard_link, "is a hard link (2 names for one file)", id="hard-link"),
])
async def test_planted_lock_never_writes_the_file_it_links_to(
    tmp_path: Path, executor: str, plant: Callable[[Path, Path], None], found: str
) -> None:
    """A .lock linked to an outside file is refused; that file stays byte-identical."""
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"not yours to truncate\n")
    os.utime(outside, ns=(1_000_000_000, 1_000_000_000))
    ck = tmp_path / "ck"
    ck.mkdir()
    plant(ck / ".lock", outside)
    with pytest.raises(StorageError, match=_unsafe(ck / ".lock", found)):
        async with CheckpointWriter(ck, executor=executor):
            pass
    assert outside.read_bytes() == b"not yours to truncate\n"
    assert os.stat(outside).st_mtime_ns == 1_000_000_000


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_dangling_lock_symlink_creates_nothing(tmp_path: Path, executor: str) -> None:
    """A dangling .lock symlink is refused and the file it names is never created."""
    target = tmp_path / "elsewhere" / "created-by-the-writer"
    target.parent.mkdir()
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / ".lock").symlink_to(target)
    with pytest.raises(StorageError, match=_unsafe(ck / ".lock", "is a symlink")):
        async with CheckpointWriter(ck, executor=executor):
            pass
    assert not os.path.lexists(target)
    assert os.listdir(target.parent) == []
    assert os.readlink(ck / ".lock") == str(target)
