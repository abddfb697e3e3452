"""Review regressions: memory.py: entries the log accepts must come back from a checkpoint.

Each test fails on the code as reviewed and passes once the finding is fixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptwriter import (
    Feedback,
    FeedbackContent,
    MemoryLog,
    Observation,
    SyncCheckpointWriter,
    load_checkpoint,
)
from conftest import snapshot


@pytest.mark.parametrize(
    "score",
    [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf")],
)
def test_non_finite_feedback_score_never_makes_an_unloadable_checkpoint(
    tmp_path: Path, score: float
) -> None:
    """A non-finite score is refused on append, or the checkpoint holding it loads back."""
    mem = MemoryLog([Observation(content="2+2?")])
    try:
        mem.append(Feedback(content=FeedbackContent(score=score, message="reward diverged")))
    except ValueError:
        return  # refused loudly at the source: the log stays loadable
    with SyncCheckpointWriter(tmp_path / "ck", executor="thread") as w:
        w.submit(snapshot(mem, 1)).wait()
    # msgspec writes NaN/inf as `null`, which FeedbackContent.score rejects on load: every
    # later checkpoint of this append-only log would be unloadable.
    assert len(load_checkpoint(tmp_path / "ck").memory) == 2


def test_failed_append_leaves_no_bytes_behind() -> None:
    """An entry that cannot be encoded leaves the log exactly as it was."""
    mem = MemoryLog([Observation(content="first")])
    before = mem.to_jsonl()
    with pytest.raises(UnicodeEncodeError):
        mem.append(Observation(content="lone surrogate \ud800"))  # e.g. surrogateescape'd output
    assert mem.to_jsonl() == before
