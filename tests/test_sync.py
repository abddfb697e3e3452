"""SyncCheckpointWriter: the async writer's options and stats, from a plain loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptwriter import ConfigError, MemoryLog, SyncCheckpointWriter
from conftest import add_episode, snapshot


def test_sync_submit_counts_one_loop_sample_per_submit(tmp_path: Path) -> None:
    """Each sync submit is one loop-time sample: capture and thread hop included, once."""
    mem = MemoryLog()
    with SyncCheckpointWriter(tmp_path, fsync=False, executor="thread") as w:
        results = []
        for ep in range(1, 4):
            add_episode(mem, ep)
            results.append(w.submit(snapshot(mem, ep)).wait())
    s = w.stats
    assert s.loop_seconds_samples == tuple(r.loop_seconds for r in results)
    assert s.loop_seconds_total == pytest.approx(sum(s.loop_seconds_samples))
    assert all(x > 0 for x in s.loop_seconds_samples)


def test_sync_writer_validates_like_the_async_one(tmp_path: Path) -> None:
    """A bad option fails in the constructor with the writer's message."""
    with pytest.raises(ConfigError, match=r"^max_pending must be an int >= 1, got 0$"):
        SyncCheckpointWriter(tmp_path, max_pending=0)
