"""Review regressions: memory.py: entries the log accepts must come back from a checkpoint.

Each test fails on the code as reviewed and passes once the finding is fixed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from ckptwriter import (
    CheckpointCorruptError,
    CheckpointFallbackWarning,
    Feedback,
    FeedbackContent,
    MemoryLog,
    Observation,
    SyncCheckpointWriter,
    load_checkpoint,
)
from ckptwriter.cli import main
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


# 100 000 nested lists: far past any decoder's depth limit (an entry nests two levels).
_DEEP_LINE = b"[" * 100_000 + b"]" * 100_000 + b"\n"


def _deeply_nested_memory(tmp_path: Path) -> Path:
    """Checkpoints ep 1 and 2 whose ep 2 memory is one deep line, its checksum matching."""
    mem = MemoryLog()
    with SyncCheckpointWriter(tmp_path / "ck", executor="thread") as w:
        for ep in (1, 2):
            mem.append(Observation(content=f"episode {ep}"))
            w.submit(snapshot(mem, ep)).wait()
    ep2 = tmp_path / "ck" / "ep_000002"
    (ep2 / "memory_2.jsonl").write_bytes(_DEEP_LINE)
    rt = json.loads((ep2 / "runtime.json").read_bytes())
    rt["files"]["memory_2.jsonl"] = {"bytes": len(_DEEP_LINE),
                                     "sha256": hashlib.sha256(_DEEP_LINE).hexdigest()}
    (ep2 / "runtime.json").write_text(json.dumps(rt))
    return ep2


def _deep_problem(ep2: Path) -> str:
    # Built-in entries nest two levels, so the typed check refuses the line at its first
    # `[` (a user type's `Any` field reaches the depth limit: tests/test_entry_types.py).
    return (rf"Checkpoint {re.escape(str(ep2))} is broken: memory_2\.jsonl: line 1 is not a "
            r"valid memory entry: Expected `object`, got `array`")


def test_deeply_nested_memory_line_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    """A line nested past the decoder's limit is CheckpointCorruptError naming file and line."""
    ep2 = _deeply_nested_memory(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=rf"^{_deep_problem(ep2)}"):
        load_checkpoint(ep2)


def test_deeply_nested_memory_line_is_skipped_from_latest(tmp_path: Path) -> None:
    """Resuming from latest skips such a checkpoint with a fallback warning naming why."""
    ep2 = _deeply_nested_memory(tmp_path)
    with pytest.warns(CheckpointFallbackWarning, match=r"^latest points at ep_000002, which "
                      r"is broken \(memory_2\.jsonl: line 1 is not a valid memory entry: "
                      r"Expected `object`, got `array`"):
        ck = load_checkpoint(ep2.parent / "latest")
    assert ck.runtime.episode_index == 1


def test_show_of_deeply_nested_memory_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ckptwriter show` exits 1 with the file and line, and no traceback."""
    ep2 = _deeply_nested_memory(tmp_path)
    assert main(["show", str(ep2)]) == 1
    err = capsys.readouterr().err
    assert re.match(rf"^error: {_deep_problem(ep2)}", err), err
    assert "Traceback" not in err
