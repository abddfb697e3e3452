"""What the benchmarks feed the writer: memory entries, a busy CPU, scratch directories.

Also the two statistics every figure is made of (nearest-rank percentile, median).
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeAlias

from ckptwriter import Action, Feedback, FeedbackContent, MemoryLog, Observation, Reflection

__all__ = [
    "Entry",
    "burn_cpu",
    "calibrate_burn",
    "checkpoint_name",
    "entry_pool",
    "fill_memory",
    "median",
    "percentile",
    "scratch",
]

# The entry types a MemoryLog holds (ckptwriter exports each, not their union).
Entry: TypeAlias = Observation | Action | Feedback | Reflection


def checkpoint_name(episode_index: int) -> str:
    """``ep_000100``: the directory name the writer gives episode 100's checkpoint."""
    return f"ep_{episode_index:06d}"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` (0..100) percentile, nearest-rank; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    """Median; 0.0 for no values."""
    return statistics.median(values) if values else 0.0


def entry_pool(n: int = 4096) -> list[Entry]:
    """Distinct entries in the 4-per-episode pattern, cycled to build large memories.

    Sizes are those of a text agent: a 160-character observation, a short action, a
    scored feedback and a one-sentence reflection (about 125 bytes per JSON line).
    """
    pool: list[Entry] = []
    for i in range(max(1, n // 4)):
        pool.append(Observation(content=f"step {i}: " + "the room has a door, a key, a lamp "
                                "and a locked chest; the agent holds nothing yet. " * 2))
        pool.append(Action(content=f"pick up the key and try the chest #{i}"))
        pool.append(Feedback(content=FeedbackContent(score=(i % 10) / 10,
                                                     message=f"chest opened on try {i}")))
        pool.append(Reflection(content=f"keys open chests; try the nearest lock first ({i})"))
    return pool


def fill_memory(n_entries: int, pool: Sequence[Entry]) -> MemoryLog:
    """A log of ``n_entries`` entries cycled from ``pool``."""
    log = MemoryLog()
    full, rest = divmod(n_entries, len(pool))
    for _ in range(full):
        log.extend(pool)
    log.extend(pool[:rest])
    return log


def burn_cpu(n: int) -> int:
    """``n`` iterations of pure-Python arithmetic (see :func:`calibrate_burn`)."""
    # It holds the GIL the whole time, like an agent's step logic.
    x = 0
    for i in range(n):
        x += i * i % 7
    return x


def calibrate_burn(seconds: float) -> int:
    """Iterations of the burn loop that take ``seconds`` of CPU here (median of 5)."""
    n = 20_000
    while True:
        t = time.perf_counter()
        burn_cpu(n)
        dt = time.perf_counter() - t
        if dt > 0.02:
            break
        n *= 2
    per_iter = []
    for _ in range(5):
        t = time.perf_counter()
        burn_cpu(n)
        per_iter.append((time.perf_counter() - t) / n)
    return max(1, round(seconds / median(per_iter)))


@contextmanager
def scratch(base: Path, name: str) -> Iterator[Path]:
    """A fresh directory inside ``base``, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"ckptbench-{name}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
