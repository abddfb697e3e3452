"""How big each benchmark is: :class:`BenchConfig` and the ``SIZES`` presets."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SIZES", "BenchConfig"]


@dataclass(frozen=True)
class BenchConfig:
    """How big each benchmark is. ``SIZES`` holds the presets.

    Attributes:
        repeats: runs per measured variant; figures are medians over them.
        loop_repeats: repeats of the overhead and stall runs: their targets (3 %, a
            ratio of two p99s below 1 ms) need more samples on a shared machine.
        episodes: episodes of the CPU-bound overhead run (target 2).
        episode_cpu_s: pure-Python CPU per episode.
        entries_per_episode: memory entries appended per episode.
        keep_last: ``last_n`` retention of the loop runs.
        stall_episodes: episodes of each stall/freshness run (targets 1, 3).
        small_memory: entries in memory for the "small" side of target 1.
        large_memory: entries in memory for the "large" side of targets 1 and 3.
        baseline_budget_s: wall-time cap of one naive baseline run (they are quadratic).
        gib_bytes: memory size of the full-write throughput run (target 4).
        incr_entries: final memory of the incremental-scaling run (target 5).
        incr_every: entries between checkpoints of that run.
        encode_entries: entries encoded by the serializer throughput run.
        floor_episodes: episodes of the issue-13 loop (targets 8 and 9; its memory is
            100,000 entries, or ``large_memory`` if smaller).
        floor_reflink: also run that loop on an XFS loop mount with reflink (root and
            mkfs.xfs needed; the row says why it was skipped otherwise).
    """

    repeats: int = 3
    loop_repeats: int = 5
    episodes: int = 5000
    episode_cpu_s: float = 0.001
    entries_per_episode: int = 4
    keep_last: int = 5
    stall_episodes: int = 2000
    small_memory: int = 1_000
    large_memory: int = 1_000_000
    baseline_budget_s: float = 8.0
    gib_bytes: int = 1 << 30
    incr_entries: int = 1_000_000
    incr_every: int = 1_000
    encode_entries: int = 400_000
    floor_episodes: int = 300
    floor_reflink: bool = True


SIZES: dict[str, BenchConfig] = {
    "full": BenchConfig(),
    "quick": BenchConfig(
        repeats=3, loop_repeats=3, episodes=1500, stall_episodes=800, large_memory=200_000,
        baseline_budget_s=3.0, gib_bytes=256 << 20, incr_entries=200_000,
        incr_every=1_000, encode_entries=200_000,
    ),
    # Seconds in total: for the smoke test, which checks structure, never targets.
    "tiny": BenchConfig(
        repeats=1, loop_repeats=1, episodes=40, episode_cpu_s=0.0002, stall_episodes=30,
        small_memory=100, large_memory=2_000, baseline_budget_s=0.3, gib_bytes=2 << 20,
        incr_entries=3_000, incr_every=1_000, encode_entries=5_000, floor_episodes=20,
        floor_reflink=False,
    ),
}
