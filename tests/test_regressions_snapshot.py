"""Review regressions: snapshot.py: capture must refuse what a reader would reject.

Each test fails on the code as reviewed and passes once the finding is fixed.
"""

from __future__ import annotations

from typing import Any

import pytest

from ckptwriter import MemoryLog, Snapshot
from ckptwriter.errors import CheckpointError


@pytest.mark.parametrize(
    "field",
    [
        pytest.param({"agent_type": None}, id="agent_type-None"),
        pytest.param({"train_steps_total": -1}, id="train_steps_total-negative"),
        pytest.param({"memory_type": 3}, id="memory_type-int"),
    ],
)
def test_capture_refuses_fields_the_reader_rejects(field: dict[str, Any]) -> None:
    """A snapshot whose runtime.json/agent.json would fail validation on load is refused."""
    # As reviewed these are written, `latest` moves to them, last_n deletes the good
    # ones, and load_checkpoint rejects them: the run cannot be resumed.
    args: dict[str, Any] = {
        "episode_index": 1, "train_steps_total": 1, "agent_type": "A", "memory": MemoryLog()
    }
    args.update(field)
    with pytest.raises(CheckpointError, match=r"^Snapshot\."):
        Snapshot(**args).capture()
