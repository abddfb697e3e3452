"""MemoryLog: append-only, typed, encoded once, captured in O(1)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ckptwriter import Action, Feedback, FeedbackContent, MemoryLog, Observation, Reflection
from conftest import add_episode


def test_entries_encode_as_the_guide_shows() -> None:
    """Each entry is one JSON line with type and content, Feedback content {score, message}."""
    log = MemoryLog()
    add_episode(log, 2, reflect=True)
    lines = [json.loads(x) for x in log.to_jsonl().splitlines()]
    assert lines == [
        {"type": "Observation", "content": "Solve: 2+2=?"},
        {"type": "Action", "content": "4"},
        {"type": "Feedback", "content": {"score": 1.0, "message": "Correct!"}},
        {"type": "Reflection", "content": "Episode 2: arithmetic works well"},
    ]


def test_entries_are_immutable() -> None:
    """An appended entry cannot be changed afterwards."""
    e = Observation(content="x")
    with pytest.raises(ValidationError):
        e.content = "y"  # type: ignore[misc]


def test_append_rejects_foreign_objects() -> None:
    """Only the four entry types can be appended."""
    with pytest.raises(TypeError, match=r"^MemoryLog entries must be"):
        MemoryLog().append({"type": "Observation", "content": "x"})  # type: ignore[arg-type]


def test_capture_does_not_see_later_appends() -> None:
    """A capture keeps its length and bytes while the log grows."""
    log = MemoryLog()
    add_episode(log, 1)
    cap = log.capture()
    before = b"".join(bytes(v) for v in cap.iter_bytes())
    for ep in range(2, 3000):
        add_episode(log, ep)
    assert cap.entries == 3
    assert b"".join(bytes(v) for v in cap.iter_bytes()) == before
    assert len(log) == 3 * 2999


@pytest.mark.parametrize("start", [0, 1, 47, 70_000, 200_000])
def test_capture_iter_bytes_from_any_offset(start: int) -> None:
    """Iterating from a byte offset yields exactly the suffix of the encoded log."""
    log = MemoryLog()
    for ep in range(5000):
        add_episode(log, ep)
    whole = log.to_jsonl()
    cap = log.capture()
    assert b"".join(bytes(v) for v in cap.iter_bytes(start)) == whole[start:]


def test_from_jsonl_round_trip_is_byte_identical() -> None:
    """Bytes read back stay exactly as they were, and appends continue after them."""
    log = MemoryLog()
    for ep in range(100):
        add_episode(log, ep, reflect=ep % 3 == 0)
    data = log.to_jsonl()
    back = MemoryLog.from_jsonl(data)
    assert back.to_jsonl() == data
    assert list(back) == list(log)
    back.append(Action(content="more"))
    assert back.to_jsonl().startswith(data)


def test_from_jsonl_keeps_foreign_formatting() -> None:
    """A file written with other spacing is preserved byte for byte."""
    data = b'{"type": "Observation", "content": "Solve: 2+2=?"}\n'
    assert MemoryLog.from_jsonl(data).to_jsonl() == data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b'{"type":"Observation","content":"x"}', "does not end with a newline",
                     id="truncated"),
        pytest.param(b'{"type":"Nope","content":"x"}\n', "line 1 is not a valid memory entry",
                     id="unknown-type"),
        pytest.param(b'{"type":"Observation"\n', "line 1 is not a valid memory entry",
                     id="bad-json"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000 + b"\n",
                     "line 1 is not a valid memory entry: JSON nested too deeply",
                     id="nested-past-the-decoder-limit"),
    ],
)
def test_from_jsonl_rejects_damaged_data(data: bytes, message: str) -> None:
    """Damaged memory files are refused with the line that is wrong."""
    with pytest.raises(ValueError, match=message):
        MemoryLog.from_jsonl(data)


def test_counts_by_type() -> None:
    """counts_by_type counts entries per type."""
    log = MemoryLog([Observation(content="a"), Action(content="b"),
                     Feedback(content=FeedbackContent(score=0.0, message="no")),
                     Reflection(content="r"), Observation(content="c")])
    assert log.counts_by_type() == {"Observation": 2, "Action": 1, "Feedback": 1, "Reflection": 1}
