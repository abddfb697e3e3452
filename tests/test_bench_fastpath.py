"""The memory fast paths tuned by the benchmarks write exactly the bytes of the slow path."""

from __future__ import annotations

import msgspec
import pytest

from ckptwriter.memory import (
    Action,
    AnyEntry,
    Feedback,
    FeedbackContent,
    MemoryLog,
    Observation,
    Reflection,
)

_ENCODER = msgspec.json.Encoder()


def _reference(entries: list[AnyEntry]) -> bytes:
    # The plain, obvious encoding: each entry's model_dump, one JSON object per line.
    return b"".join(_ENCODER.encode(e.model_dump()) + b"\n" for e in entries)


class _Note(Observation):
    """A subclass with an extra field: refused unless registered (it would be dropped)."""

    note: str = "internal"


ENTRIES: list[AnyEntry] = [
    Observation(content='héllo "quoted"\nnew line \u2603'),
    Action(content=""),
    Feedback(content=FeedbackContent(score=0.1, message="m")),
    Feedback(content=FeedbackContent(score=-1e300, message="big")),
    Reflection(content="r" * 70_000),
    Observation.model_construct(content="built without validation"),
]


@pytest.mark.parametrize(
    ("how"),
    [pytest.param("append", id="append"), pytest.param("extend", id="extend")],
)
def test_fast_paths_write_reference_bytes(how: str) -> None:
    """append() and extend() encode every entry type exactly like model_dump + json."""
    log = MemoryLog()
    if how == "append":
        for e in ENTRIES:
            log.append(e)
    else:
        log.extend(ENTRIES)
    assert log.to_jsonl() == _reference(ENTRIES)


def test_extend_across_batches_keeps_order_and_count() -> None:
    """extend() over many batches keeps every entry, in order."""
    entries = ENTRIES[:4] * 1000
    log = MemoryLog(entries)
    assert len(log) == 4000
    assert log.to_jsonl() == _reference(entries)


def test_subclass_entry_is_refused_not_written_as_its_base() -> None:
    """An unregistered subclass of an entry type is a TypeError, nothing written."""
    log = MemoryLog()
    with pytest.raises(TypeError, match=r"^_Note is a subclass of Observation with its own "
                                        r"fields \(note\)"):
        log.append(_Note(content="x"))
    assert log.to_jsonl() == b""


def test_extend_rejects_foreign_object_after_earlier_entries() -> None:
    """extend() raises on a foreign object and appends none of the entries before it."""
    log = MemoryLog()
    with pytest.raises(TypeError, match=r"^MemoryLog entries must be .*got int, which cannot "
                       r"be an entry type"):
        log.extend([Action(content="a"), 5])  # type: ignore[list-item]
    assert len(log) == 0
    assert log.to_jsonl() == b""


def test_capture_after_extend_roundtrips() -> None:
    """A log built by extend() reads back identically from its JSON Lines."""
    log = MemoryLog(ENTRIES[:4] * 100)
    again = MemoryLog.from_jsonl(log.to_jsonl())
    assert list(again) == list(log)
