"""The workload every ``ckptwriter bench`` figure runs: a text agent's memory and episodes."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .memory import Action, Feedback, FeedbackContent, MemoryLog, Observation, Reflection

__all__ = ["SWITCH_INTERVAL", "entries", "memory_of", "percentile", "raw_write"]

# The interval `ckptwriter train` runs under (switch_interval's default).
SWITCH_INTERVAL = 0.0005


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank: a sample that happened."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))] if s else 0.0


def entries() -> list[Observation | Action | Feedback | Reflection]:
    """One episode of a text agent: about 110 bytes per JSON line on average."""
    return [
        Observation(content="the room has a door, a key, a lamp and a locked chest; " * 3),
        Action(content="pick up the key and try the chest"),
        Feedback(content=FeedbackContent(score=0.5, message="the chest opened")),
        Reflection(content="keys open chests; try the nearest lock first"),
    ]


def memory_of(n_entries: int) -> MemoryLog:
    """A memory of ``n_entries`` entries, episodes of :func:`entries` repeated."""
    episode = entries()
    return MemoryLog([episode[i % 4] for i in range(n_entries)])


def raw_write(path: Path, data: bytes) -> float:
    """Seconds to write ``data`` to a new file at ``path`` and fsync it: the disk floor."""
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


