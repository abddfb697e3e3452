"""The suite's workload helpers and statistics."""

from __future__ import annotations

import pytest
from benchmarks.workload import percentile


@pytest.mark.parametrize(
    ("q", "expected"),
    [pytest.param(50, 50.0, id="p50"), pytest.param(99, 99.0, id="p99"),
     pytest.param(100, 100.0, id="max"), pytest.param(0, 1.0, id="min")],
)
def test_percentile_is_nearest_rank(q: float, expected: float) -> None:
    """percentile() is the nearest-rank percentile of the samples."""
    assert percentile([float(i) for i in range(100, 0, -1)], q) == expected
