"""Names and paths (ckptwriter.layout): the one run ordering."""

from __future__ import annotations

import pytest

from ckptwriter import layout


@pytest.mark.parametrize("names", [
    pytest.param(["20240101_000000", "20240101_000000_1", "20240101_000000_2",
                  "20240101_000000_10"], id="same-second"),
    pytest.param(["20231231_235959_10", "20240101_000000"], id="next-second"),
    pytest.param(["run_2", "run_10", "run_10a"], id="run-names"),
])
def test_run_sort_key_is_natural_order(names: list[str]) -> None:
    """Runs sort by their numbers, not as strings: _2 before _10."""
    assert sorted(reversed(names), key=layout.run_sort_key) == names
