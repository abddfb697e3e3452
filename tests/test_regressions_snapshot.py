"""Review regressions: snapshot.py: capture must refuse what a reader would reject.

Each test fails on the code as reviewed and passes once the finding is fixed.
"""

from __future__ import annotations

from pathlib import Path
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


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        pytest.param({"optimizer.json": {"lr": [0.1, float("nan")]}},
                     r"extra_files\['optimizer\.json'\]\['lr'\]\[1\] is nan", id="nested-nan"),
        pytest.param({"stats.json": float("inf")}, r"extra_files\['stats\.json'\] is inf",
                     id="top-level-inf"),
        pytest.param({"s.json": {"ok": None, "t": [1.0, {"x": float("-inf")}]}},
                     r"extra_files\['s\.json'\]\['t'\]\[1\]\['x'\] is -inf", id="beside-null"),
    ],
)
def test_nan_in_extra_files_is_refused_with_its_path(
    tmp_path: Path, extra: dict[str, Any], where: str
) -> None:
    """NaN/inf in extra_files is a CheckpointError naming key and path; nothing is written."""
    # As reviewed, msgspec wrote them as null: the state came back as None, silently.
    from ckptwriter import SyncCheckpointWriter

    snap = Snapshot(1, 1, "A", MemoryLog(), extra_files=extra)
    message = rf"^{where}: JSON has no NaN or infinity \(it would be written as null"
    with pytest.raises(CheckpointError, match=message):
        snap.capture()
    with SyncCheckpointWriter(tmp_path / "ck", executor="thread") as w, \
            pytest.raises(CheckpointError, match=message):
        w.submit(snap)
    assert not list((tmp_path / "ck").glob("ep_*"))
