"""CheckpointWriter: layout, incremental memory, isolation, backpressure, errors, lifecycle.

Runs on asyncio and trio through anyio's pytest plugin.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from ckptwriter import (
    CheckpointWriter,
    DirectoryLockedError,
    MemoryLog,
    StorageError,
    WriterClosedError,
    WriterFailedError,
    load_checkpoint,
    resolve_checkpoint,
    switch_interval,
)
from ckptwriter.layout import parse_checkpoint_name
from ckptwriter.storage import LocalStorage
from conftest import add_episode, snapshot

pytestmark = pytest.mark.anyio


class SlowStorage(LocalStorage):
    """A disk that takes ``delay`` seconds per commit."""

    def __init__(self, root: Path, delay: float) -> None:
        super().__init__(root, fsync=False)
        self.delay = delay

    def begin(self, name: str) -> Any:
        time.sleep(self.delay)
        return super().begin(name)


class FailingStorage(LocalStorage):
    """A disk that refuses the commits of the given episodes."""

    def __init__(self, root: Path, fail: set[int]) -> None:
        super().__init__(root, fsync=False)
        self.fail = fail

    def begin(self, name: str) -> Any:
        if parse_checkpoint_name(name) in self.fail:
            raise StorageError(f"No space left on device while writing {self.root}")
        return super().begin(name)


async def test_layout_after_each_checkpoint(tmp_path: Path) -> None:
    """Each checkpoint has the guide's files; latest (and, scored, best) is a symlink plus JSON."""
    root = tmp_path / "checkpoints"
    mem = MemoryLog()
    async with CheckpointWriter(root) as w:
        for ep in (100, 200, 300):
            add_episode(mem, ep)
            await (await w.submit(snapshot(mem, ep, val_score=0.5))).wait()
            d = root / f"ep_{ep:06d}"
            assert sorted(os.listdir(d)) == ["agent.json", f"memory_{ep}.jsonl", "runtime.json"]
            assert os.readlink(root / "latest") == f"ep_{ep:06d}"
            ptr = json.loads((root / "latest.json").read_text())
            assert ptr["checkpoint"] == f"ep_{ep:06d}"
            assert ptr["episode_index"] == ep
    assert sorted(p for p in os.listdir(root) if not p.startswith(".")) == [
        "best", "best.json", "ep_000100", "ep_000200", "ep_000300", "latest", "latest.json"]
    # Equal scores: best goes to the newer, as top_k_val ranks them.
    assert os.readlink(root / "best") == "ep_000300"


async def test_runtime_json_has_the_guide_fields(tmp_path: Path) -> None:
    """runtime.json holds the guide's fields plus format_version and per-file digests."""
    mem = MemoryLog()
    add_episode(mem, 1)
    async with CheckpointWriter(tmp_path) as w:
        await (await w.submit(snapshot(mem, 100, val_score=0.52))).wait()
    rt = json.loads((tmp_path / "ep_000100" / "runtime.json").read_text())
    assert list(rt)[:6] == ["timestamp", "episode_index", "train_steps_total", "agent_type",
                            "memory_snapshot_path", "val_score"]
    assert rt["episode_index"] == 100
    assert rt["memory_snapshot_path"] == "memory_100.jsonl"
    assert rt["timestamp"].endswith("Z")
    assert rt["format_version"] == 1
    assert rt["files"]["memory_100.jsonl"]["bytes"] == mem.nbytes
    agent = (tmp_path / "ep_000100" / "agent.json").read_text()
    assert '"memory_type": "history"' in agent.splitlines()[2]


async def test_only_the_delta_is_serialized(tmp_path: Path) -> None:
    """Entries serialized per checkpoint equal the entries appended since the previous one."""
    mem = MemoryLog()
    deltas, reported = [], []
    async with CheckpointWriter(tmp_path, fsync=False) as w:
        for ep in range(1, 30):
            before = len(mem)
            for _ in range(ep % 4):
                add_episode(mem, ep)
            deltas.append(len(mem) - before)
            r = await (await w.submit(snapshot(mem, ep))).wait()
            reported.append((r.entries_serialized, r.incremental))
            assert (tmp_path / r.name / f"memory_{ep}.jsonl").read_bytes() == mem.to_jsonl()
    assert [e for e, _ in reported] == [deltas[0], *deltas[1:]]
    assert [inc for _, inc in reported] == [False] + [True] * 28
    assert w.stats.entries_serialized == len(mem)


async def test_new_log_falls_back_to_full_write(tmp_path: Path) -> None:
    """A different memory log (e.g. after a restart) is written in full, not appended."""
    a, b = MemoryLog(), MemoryLog()
    add_episode(a, 1)
    add_episode(b, 2)
    async with CheckpointWriter(tmp_path, fsync=False) as w:
        await (await w.submit(snapshot(a, 1))).wait()
        r = await (await w.submit(snapshot(b, 2))).wait()
    assert not r.incremental
    assert (tmp_path / "ep_000002" / "memory_2.jsonl").read_bytes() == b.to_jsonl()


async def test_state_changed_after_submit_is_not_written(tmp_path: Path) -> None:
    """Appending to memory and mutating extra_files after submit never changes the checkpoint."""
    mem = MemoryLog()
    add_episode(mem, 1)
    extra: dict[str, Any] = {"optimizer.json": {"step": 1, "m": [1, 2]}}
    cfg = {"lr": 0.1}
    async with CheckpointWriter(tmp_path, fsync=False) as w:
        expected = mem.to_jsonl()
        h = await w.submit(snapshot(mem, 1, extra_files=extra, agent_config=cfg))
        add_episode(mem, 2)
        extra["optimizer.json"]["m"].append(3)
        cfg["lr"] = 9.0
        await h.wait()
    loaded = load_checkpoint(tmp_path / "ep_000001")
    assert loaded.memory.to_jsonl() == expected
    assert json.loads(loaded.extra_files["optimizer.json"]) == {"step": 1, "m": [1, 2]}
    assert loaded.agent.config == {"lr": 0.1}


async def test_block_policy_stalls_and_loses_nothing(tmp_path: Path) -> None:
    """With a slow disk, block makes submit wait (counted) and writes every snapshot."""
    mem = MemoryLog()
    async with CheckpointWriter(storage=SlowStorage(tmp_path, 0.02), max_pending=1) as w:
        for ep in range(1, 9):
            add_episode(mem, ep)
            await w.submit(snapshot(mem, ep))
            assert w.stats.pending <= 2
    s = w.stats
    assert s.written == 8
    assert s.stalls >= 1
    assert s.stall_seconds > 0
    assert len([p for p in os.listdir(tmp_path) if p.startswith("ep_")]) == 8


async def test_coalesce_policy_never_waits_and_counts(tmp_path: Path) -> None:
    """With a slow disk, coalesce replaces queued snapshots; the newest is always written."""
    mem = MemoryLog()
    handles = []
    async with CheckpointWriter(storage=SlowStorage(tmp_path, 0.05), max_pending=1,
                                on_backlog="coalesce") as w:
        for ep in range(1, 21):
            add_episode(mem, ep)
            handles.append(await w.submit(snapshot(mem, ep)))
            assert w.stats.pending <= 2
        results = [await h.wait() for h in handles]
    s = w.stats
    assert s.stalls == 0
    assert s.coalesced > 0
    assert s.written + s.coalesced == 20
    assert results[-1].episode_index == 20
    assert any(h.coalesced for h in handles)
    for h, r in zip(handles, results, strict=True):
        assert r.episode_index >= h.episode_index
    assert load_checkpoint(tmp_path).runtime.episode_index == 20


async def test_failure_raises_on_next_submit(tmp_path: Path) -> None:
    """A failed write is raised from the next submit and again at exit; earlier work stays."""
    mem = MemoryLog()
    add_episode(mem, 1)
    w = CheckpointWriter(storage=FailingStorage(tmp_path, {2}))
    await w.__aenter__()
    await (await w.submit(snapshot(mem, 1))).wait()
    h = await w.submit(snapshot(mem, 2))
    with pytest.raises(WriterFailedError, match=r"^checkpoint for episode 2 was not written"):
        await h.wait()
    with pytest.raises(WriterFailedError, match=r"^checkpoint for episode 2 failed: No space"):
        await w.submit(snapshot(mem, 3))
    with pytest.raises(WriterFailedError, match=r"^checkpoint for episode 2 failed: No space"):
        await w.flush()
    with pytest.raises(WriterFailedError, match=r"^checkpoint for episode 2 failed: No space"):
        await w.__aexit__(None, None, None)
    assert isinstance(w.stats.failed, int)
    assert w.stats.failed == 1
    assert os.readlink(tmp_path / "latest") == "ep_000001"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


async def test_warn_policy_keeps_going(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """on_error=warn logs the failure and the next checkpoint is written."""
    mem = MemoryLog()
    add_episode(mem, 1)
    with caplog.at_level(logging.WARNING, logger="ckptwriter"):
        async with CheckpointWriter(storage=FailingStorage(tmp_path, {2}), on_error="warn") as w:
            for ep in (1, 2, 3):
                await w.submit(snapshot(mem, ep))
            await w.flush()
    assert "checkpoint for episode 2 failed" in caplog.text
    assert w.stats.failed == 1
    assert w.stats.written == 2
    assert os.readlink(tmp_path / "latest") == "ep_000003"


async def test_second_writer_is_refused(tmp_path: Path) -> None:
    """Only one writer may own a checkpoints directory."""
    async with CheckpointWriter(tmp_path):
        with pytest.raises(DirectoryLockedError, match=r"is locked by another writer \(pid"):
            async with CheckpointWriter(tmp_path):
                pass
    async with CheckpointWriter(tmp_path):
        pass


async def test_leftovers_are_cleaned_on_start(tmp_path: Path) -> None:
    """Temp and trash entries of a crashed writer disappear when a writer starts."""
    (tmp_path / ".tmp-ep_000001-dead").mkdir()
    (tmp_path / ".tmp-ep_000001-dead" / "memory_1.jsonl").write_text("partial")
    (tmp_path / ".trash-ep_000000-beef").mkdir()
    async with CheckpointWriter(tmp_path):
        pass
    assert sorted(os.listdir(tmp_path)) == [".lock"]


async def test_lifecycle_errors(tmp_path: Path) -> None:
    """Submitting outside the context, or entering twice, is a clear error."""
    w = CheckpointWriter(tmp_path)
    mem = MemoryLog()
    with pytest.raises(WriterClosedError, match=r"^CheckpointWriter is new: use it inside"):
        await w.submit(snapshot(mem, 1))
    async with w:
        pass
    with pytest.raises(WriterClosedError, match=r"^CheckpointWriter is closed"):
        await w.submit(snapshot(mem, 1))
    with pytest.raises(WriterClosedError, match=r"can be entered only once"):
        async with w:
            pass


async def test_body_exception_still_drains(tmp_path: Path) -> None:
    """Queued checkpoints are written even when the training code raises."""
    mem = MemoryLog()

    async def train() -> None:
        async with CheckpointWriter(storage=SlowStorage(tmp_path, 0.02)) as w:
            for ep in (1, 2, 3):
                await w.submit(snapshot(mem, ep))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match=r"^boom$"):
        await train()
    assert os.readlink(tmp_path / "latest") == "ep_000003"


async def test_cancellation_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    """Cancelling the scope stops the writer after the commit in progress, nothing half-done."""
    mem = MemoryLog()
    # Cancelled once the first checkpoint is durable (bounded by work, not the clock:
    # a busy machine may take longer than any fixed delay to write the first one).
    with anyio.CancelScope() as scope:
        async with CheckpointWriter(storage=SlowStorage(tmp_path, 0.03)) as w:
            first = await w.submit(snapshot(mem, 1))
            for ep in range(2, 100):
                await w.submit(snapshot(mem, ep))
                if first.done():
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()
            await first.wait()
            scope.cancel()
            await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.startswith(".tmp-")]
    resolved = resolve_checkpoint(tmp_path)
    assert resolved.name in names


async def test_reader_never_sees_a_partial_checkpoint(tmp_path: Path) -> None:
    """A thread polling `latest` while the writer runs always loads a verified checkpoint:
    no error, no fallback warning, over at least 120 commits and 20 loads."""
    mem = MemoryLog()
    errors: list[str] = []
    loaded: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                try:
                    loaded.append(load_checkpoint(tmp_path / "latest").runtime.episode_index)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
            errors.extend(f"{w.category.__name__}: {w.message}" for w in seen)

    async with CheckpointWriter(tmp_path, keep_last=2, fsync=False) as w:
        await (await w.submit(snapshot(mem, 0))).wait()
        reader = threading.Thread(target=poll)
        reader.start()
        try:
            # Bounded by work, not time: enough commits and enough loads (a starved
            # reader thread makes the writer go on, up to a cap), or the first failure.
            ep = 0
            while (ep < 120 or len(loaded) < 20) and ep < 20_000 and not errors:
                ep += 1
                add_episode(mem, ep)
                await w.submit(snapshot(mem, ep))
                await anyio.lowlevel.checkpoint()
            await w.flush()
        finally:
            stop.set()
            reader.join()
    assert errors == []
    assert len(loaded) >= 20
    assert loaded == sorted(loaded)


async def test_writer_progresses_while_loop_is_cpu_bound(tmp_path: Path) -> None:
    """With the documented switch_interval opt-in, a loop that only awaits sleep(0) still
    sees its checkpoints become durable (at CPython's default 5 ms the thread starves)."""
    mem = MemoryLog()
    with switch_interval():
        await _cpu_bound_run(tmp_path, mem)


async def _cpu_bound_run(tmp_path: Path, mem: MemoryLog) -> None:
    async with CheckpointWriter(tmp_path, on_backlog="coalesce", keep_last=3) as w:
        h = None
        deadline = time.monotonic() + 20
        for ep in range(1, 10_000):
            add_episode(mem, ep)
            h = await w.submit(snapshot(mem, ep))
            t = time.perf_counter()
            while time.perf_counter() - t < 0.001:
                pass
            await anyio.lowlevel.checkpoint()
            if w.stats.written >= 5 or time.monotonic() > deadline:
                break
        assert h is not None
        assert w.stats.written >= 5


async def test_stats_report_loop_time(tmp_path: Path) -> None:
    """Stats count submits, loop time and percentiles."""
    mem = MemoryLog()
    async with CheckpointWriter(tmp_path, fsync=False) as w:
        for ep in range(1, 6):
            await (await w.submit(snapshot(mem, ep))).wait()
    s = w.stats
    assert s.submitted == s.written == 5
    assert len(s.loop_seconds_samples) == 5
    assert 0 < s.loop_seconds_quantile(0.99) <= s.loop_seconds_max
    assert s.bytes_written > 0


async def test_starved_writer_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that runs far too long makes submit log the GIL fix, once."""
    monkeypatch.setattr("ckptwriter.writer._STARVED_SECONDS", 0.05)
    mem = MemoryLog()
    with caplog.at_level(logging.WARNING, logger="ckptwriter"):
        async with CheckpointWriter(storage=SlowStorage(tmp_path, 0.3),
                                    on_backlog="coalesce") as w:
            await w.submit(snapshot(mem, 1))
            await anyio.sleep(0.15)
            for ep in range(2, 5):
                await w.submit(snapshot(mem, ep))
    assert caplog.text.count("ckptwriter.switch_interval()") == 1


async def test_submit_counts_loop_time_from_started_at(tmp_path: Path) -> None:
    """submit(started_at=...) counts the caller's earlier cost as loop time, once."""
    mem = MemoryLog()
    async with CheckpointWriter(tmp_path, fsync=False, executor="thread") as w:
        h = await w.submit(snapshot(mem, 1), started_at=time.perf_counter() - 0.5)
        result = await h.wait()
    s = w.stats
    assert result.loop_seconds >= 0.5
    assert s.loop_seconds_samples == (result.loop_seconds,)
    assert s.loop_seconds_total == s.loop_seconds_max == result.loop_seconds


async def test_symlinked_checkpoint_dir_keeps_its_checkpoints(tmp_path: Path) -> None:
    """A checkpoint_dir that is a symlink is resolved once: its checkpoints are known."""
    real = tmp_path / "big-disk" / "ckpts"
    real.mkdir(parents=True)
    link = tmp_path / "checkpoints"
    link.symlink_to(real)
    mem = MemoryLog()
    for ep in (1, 2):
        async with CheckpointWriter(link, keep_last=2, executor="thread") as w:
            add_episode(mem, ep)
            await (await w.submit(snapshot(mem, ep))).wait()
    async with CheckpointWriter(link, keep_last=2) as w:
        assert [r.name for r in w.checkpoints] == ["ep_000001", "ep_000002"]
        add_episode(mem, 3)
        await (await w.submit(snapshot(mem, 3))).wait()
    assert sorted(n for n in os.listdir(real) if n.startswith("ep_")) == [
        "ep_000002", "ep_000003"]
