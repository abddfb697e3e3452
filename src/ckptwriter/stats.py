"""The writer's counters: typed while counting, a frozen copy for the caller."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .commit import CommitReport

__all__ = ["Counters", "WriterStats"]

# Samples kept for submit-latency percentiles: enough for a p99 over a long window.
_SAMPLES = 10_000


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of a writer since it started (a consistent copy; see ``writer.stats``)."""

    submitted: int = 0
    written: int = 0
    coalesced: int = 0
    failed: int = 0
    pending: int = 0
    stalls: int = 0
    stall_seconds: float = 0.0
    loop_seconds_total: float = 0.0
    loop_seconds_max: float = 0.0
    queue_wait_seconds_total: float = 0.0
    serialize_seconds_total: float = 0.0
    write_seconds_total: float = 0.0
    bytes_written: int = 0
    bytes_reused: int = 0
    files_linked: int = 0
    bytes_serialized: int = 0
    entries_serialized: int = 0
    deleted: int = 0
    retention_errors: int = 0
    loop_seconds_samples: tuple[float, ...] = ()

    def loop_seconds_quantile(self, q: float) -> float:
        """A quantile (0..1) of the recent per-submit loop times; 0.0 with no samples."""
        s = sorted(self.loop_seconds_samples)
        if not s:
            return 0.0
        return s[min(len(s) - 1, math.ceil(q * len(s)) - 1 if q > 0 else 0)]



@dataclass(slots=True)
class Counters:
    """What a writer counts as it goes (one event loop updates it; no locking)."""

    submitted: int = 0
    written: int = 0
    coalesced: int = 0
    failed: int = 0
    stalls: int = 0
    stall_seconds: float = 0.0
    loop_seconds_total: float = 0.0
    loop_seconds_max: float = 0.0
    queue_wait_seconds_total: float = 0.0
    serialize_seconds_total: float = 0.0
    write_seconds_total: float = 0.0
    bytes_written: int = 0
    bytes_reused: int = 0
    files_linked: int = 0
    bytes_serialized: int = 0
    entries_serialized: int = 0
    deleted: int = 0
    retention_errors: int = 0
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))

    def add_loop_time(self, dt: float) -> None:
        """One submit's cost to the loop."""
        self.samples.append(dt)
        self.loop_seconds_total += dt
        self.loop_seconds_max = max(self.loop_seconds_max, dt)

    def add_report(self, o: CommitReport, queue_wait: float) -> None:
        """One commit that succeeded, after ``queue_wait`` seconds in the queue."""
        self.written += 1
        self.bytes_written += o.bytes_written
        self.bytes_reused += o.bytes_reused
        self.files_linked += o.files_linked
        self.bytes_serialized += o.bytes_serialized
        self.entries_serialized += o.entries_serialized
        self.deleted += len(o.deleted)
        self.queue_wait_seconds_total += queue_wait
        self.serialize_seconds_total += o.serialize_seconds
        self.write_seconds_total += o.write_seconds
        if o.retention_error is not None:
            self.retention_errors += 1

    def snapshot(self, pending: int) -> WriterStats:
        """A consistent frozen copy."""
        return WriterStats(
            submitted=self.submitted, written=self.written, coalesced=self.coalesced,
            failed=self.failed, pending=pending, stalls=self.stalls,
            stall_seconds=self.stall_seconds, loop_seconds_total=self.loop_seconds_total,
            loop_seconds_max=self.loop_seconds_max,
            queue_wait_seconds_total=self.queue_wait_seconds_total,
            serialize_seconds_total=self.serialize_seconds_total,
            write_seconds_total=self.write_seconds_total, bytes_written=self.bytes_written,
            bytes_reused=self.bytes_reused, files_linked=self.files_linked,
            bytes_serialized=self.bytes_serialized,
            entries_serialized=self.entries_serialized, deleted=self.deleted,
            retention_errors=self.retention_errors,
            loop_seconds_samples=tuple(self.samples),
        )
