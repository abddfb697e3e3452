"""Shared test helpers: small builders for memory logs and snapshots."""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from ckptwriter import (
    Action,
    Feedback,
    FeedbackContent,
    MemoryLog,
    Observation,
    Reflection,
    Snapshot,
)

# Property tests judge results, never speed: on a busy machine (two suites at once)
# hypothesis's deadline and its "input generation is slow" check fail correct code.
settings.register_profile("ckptwriter", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ckptwriter")


def add_episode(memory: MemoryLog, ep: int, *, reflect: bool = False) -> None:
    """Append one episode's worth of entries, as the reference runtime does."""
    memory.append(Observation(content=f"Solve: {ep}+{ep}=?"))
    memory.append(Action(content=str(2 * ep)))
    memory.append(Feedback(content=FeedbackContent(score=1.0, message="Correct!")))
    if reflect:
        memory.append(Reflection(content=f"Episode {ep}: arithmetic works well"))


def snapshot(memory: MemoryLog, ep: int, val_score: float | None = None, **kw: Any) -> Snapshot:
    """A snapshot of ``memory`` at episode ``ep``."""
    kw.setdefault("agent_config", {"lr": 0.1})
    return Snapshot(
        episode_index=ep,
        train_steps_total=ep * 2,
        agent_type="HistoryAgent",
        memory=memory,
        val_score=val_score,
        **kw,
    )


def big_memory(mib: int, tag: str = "m") -> MemoryLog:
    """A memory of at least ``mib`` MiB in ~2 KiB entries whose bytes differ by position."""
    mem = MemoryLog()
    while mem.nbytes < mib << 20:
        mem.append(Observation(content=f"{tag}{mem.nbytes}" * 700))
    return mem


def files_match_their_digests(path: Path) -> dict[str, bytes]:
    """Every file runtime.json lists, read back, with the size and sha256 it records."""
    listed = json.loads((path / "runtime.json").read_text())["files"]
    out = {}
    for name, entry in listed.items():
        data = (path / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == \
            (entry["bytes"], entry["sha256"]), name
        out[name] = data
    return out


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (mincore of a mapping of it)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    holder = ctypes.c_char.from_buffer(m)
    try:
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(holder)), ctypes.c_size_t(size),
                          vec)
        assert rc == 0, os.strerror(ctypes.get_errno())
    finally:
        del holder
        m.close()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def direct_writes_skip_the_cache(directory: Path) -> str | None:
    """Why a direct write in ``directory`` cannot be seen to skip the page cache (no
    O_DIRECT, refused, or the filesystem caches it anyway: tmpfs), or None."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return "no O_DIRECT on this system"
    probe = directory / ".direct-probe"
    buf = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o644)
        try:
            os.write(fd, buf)
        finally:
            os.close(fd)
        if resident_bytes(probe):
            return f"{directory}'s filesystem keeps direct writes in memory (tmpfs, say)"
    except OSError as exc:
        return f"{directory}'s filesystem refuses O_DIRECT ({exc})"
    finally:
        buf.close()
        probe.unlink(missing_ok=True)
    return None


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run anyio-marked tests on both asyncio and trio."""
    return str(request.param)


def open_dir(storage: Any) -> list[Any]:
    """Open a backend as a writer does (lock, leftovers) and list what is committed."""
    from ckptwriter.commit import CommitPipeline
    from ckptwriter.retention import KeepAll

    return CommitPipeline(storage, KeepAll()).open()


# -- order of the files under `make test` (pytest -n 2 --dist loadfile) ------------------

# Files that start first, before the others (most tests first, as xdist would order them):
# the kill -9 torture has few tests but runs for minutes; started among the last files,
# it would be the whole tail of the run with the other worker idle.
_FIRST = ("test_reliability_torture.py",)


def pytest_configure(config: pytest.Config) -> None:
    """Keep the file order below: xdist would otherwise reorder by number of tests."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of _FIRST first, then by number of tests, most first (a stable sort:
    the tests of a file keep their order)."""
    counts = Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path.name not in _FIRST, -counts[item.path]))
