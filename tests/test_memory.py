"""MemoryLog: append-only, typed, encoded once, captured in O(1)."""

from __future__ import annotations

import copy
import json
import pickle
import sys

import pytest
from pydantic import ValidationError

from ckptwriter import (
    Action,
    Feedback,
    FeedbackContent,
    MemoryLog,
    Observation,
    Reflection,
    UnknownEntryTypeError,
)
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
        pytest.param(b'{"type":"Observation","content":5}\n',
                     "line 1 is not a valid memory entry: Expected `str`, got `int`",
                     id="wrong-field-type"),
        pytest.param(b'{"content":"x"}\n', "line 1 is not a valid memory entry",
                     id="no-type"),
        pytest.param(b'{"type":"Feedback","content":{"score":1e999,"message":"m"}}\n',
                     "line 1 is not a valid memory entry", id="score-out-of-range"),
        pytest.param(b'{"type":"Observation"\n', "line 1 is not a valid memory entry",
                     id="bad-json"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000 + b"\n",
                     "line 1 is not a valid memory entry", id="deeply-nested-line"),
    ],
)
def test_from_jsonl_rejects_damaged_data(data: bytes, message: str) -> None:
    """Damaged memory files are refused with the line that is wrong."""
    with pytest.raises(ValueError, match=message):
        MemoryLog.from_jsonl(data)


@pytest.mark.parametrize("raw", [pytest.param(False, id="typed"), pytest.param(True, id="raw")])
def test_from_jsonl_refuses_a_line_nested_past_the_decoder_limit(raw: bool) -> None:
    """A line nested past msgspec's depth limit is a ValueError naming the line."""
    deep = b"[" * 100_000 + b"]" * 100_000
    data = b'{"type":"Action","content":"a"}\n{"type":"Action","content":' + deep + b"}\n"
    with pytest.raises(ValueError, match=r"^line 2 is not a valid memory entry: "):
        MemoryLog.from_jsonl(data, raw=raw)


def test_from_jsonl_names_an_unknown_tag() -> None:
    """A tag no passed type has is UnknownEntryTypeError naming it and its first line."""
    data = b'{"type":"Action","content":"a"}\n{"type":"Nope","content":"x"}\n'
    with pytest.raises(UnknownEntryTypeError, match=r"^Memory not restored: the memory "
                       r"file holds entries of type 'Nope' \(first on line 2\)"):
        MemoryLog.from_jsonl(data)


def test_loaded_log_reads_like_a_list() -> None:
    """Indexing, negative indices, slices and iteration span the file and later appends."""
    log = MemoryLog()
    for ep in range(3000):
        add_episode(log, ep, reflect=ep % 3 == 0)
    back = MemoryLog.from_jsonl(log.to_jsonl())
    back.append(Action(content="more"))
    log.append(Action(content="more"))
    whole = list(log)
    assert list(back) == whole
    assert len(back) == len(whole)
    for i in (0, 1, 5000, len(whole) - 2, -1, -len(whole)):
        assert back[i] == whole[i]
    for sl in (slice(0, 10), slice(4000, 9000), slice(-5, None), slice(None, None, 7),
               slice(len(whole) - 1, len(whole) + 5), slice(10, 3)):
        assert back[sl] == whole[sl]
    with pytest.raises(IndexError):
        back[len(whole)]


def test_counts_by_type() -> None:
    """counts_by_type counts entries per type."""
    log = MemoryLog([Observation(content="a"), Action(content="b"),
                     Feedback(content=FeedbackContent(score=0.0, message="no")),
                     Reflection(content="r"), Observation(content="c")])
    assert log.counts_by_type() == {"Observation": 2, "Action": 1, "Feedback": 1, "Reflection": 1}
    back = MemoryLog.from_jsonl(log.to_jsonl())
    back.append(Action(content="d"))
    assert back.counts_by_type() == {"Observation": 2, "Action": 2, "Feedback": 1,
                                     "Reflection": 1}


_BUILTINS = [Observation(content="o ☃"), Action(content="a"),
             Feedback(content=FeedbackContent(score=-0.5, message="m")),
             Reflection(content="r")]


def test_read_back_entries_behave_like_validated_ones() -> None:
    """Entries built from a file (not re-validated) equal, hash, copy and pickle like the
    validated ones, and append again to the same bytes."""
    back = MemoryLog.from_jsonl(MemoryLog(_BUILTINS).to_jsonl())[:]
    for got, want in zip(back, _BUILTINS, strict=True):
        assert type(got) is type(want)
        assert got == want
        assert hash(got) == hash(want)
        assert got.model_dump() == want.model_dump()
        assert pickle.loads(pickle.dumps(got)) == want
        assert copy.deepcopy(got) == want
        changed = got.model_copy(update={"content": want.content})
        assert changed == want
    assert isinstance(back[2].content, FeedbackContent)
    assert type(back[2].content.score) is float
    # Both fast paths take them as they take validated entries.
    one_by_one = MemoryLog()
    for e in back:
        one_by_one.append(e)
    assert one_by_one.to_jsonl() == MemoryLog(back).to_jsonl() == MemoryLog(_BUILTINS).to_jsonl()


def test_the_shared_fields_set_of_read_back_entries_cannot_be_changed() -> None:
    """Entries read back share one model_fields_set: changing it is refused, copies are
    plain sets."""
    a, b = MemoryLog.from_jsonl(MemoryLog(_BUILTINS[:2]).to_jsonl())[:]
    assert a.model_fields_set == {"type", "content"}
    with pytest.raises(TypeError, match=r"shared by all such entries .* change a copy"):
        a.model_fields_set.add("x")
    assert b.model_fields_set == {"type", "content"}
    mine = copy.copy(a.model_fields_set)
    mine.add("x")
    assert type(pickle.loads(pickle.dumps(a.model_fields_set))) is set


def test_reading_a_loaded_log_does_not_validate_entry_by_entry() -> None:
    """A loaded log builds built-in entries from the checked lines without calling pydantic
    per entry (a million entries took seconds that way): work counted, not timed."""
    log = MemoryLog()
    for ep in range(500):
        add_episode(log, ep, reflect=ep % 2 == 0)
    back = MemoryLog.from_jsonl(log.to_jsonl())
    calls: list[str] = []

    def count(frame: object, event: str, arg: object) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") in (
                "validate_python", "model_construct"):
            calls.append(arg.__name__)  # type: ignore[attr-defined]
        elif event == "call" and getattr(frame, "f_code", None) is not None \
                and frame.f_code.co_name == "model_construct":  # type: ignore[attr-defined]
            calls.append("model_construct")

    sys.setprofile(count)
    try:
        entries = back[:]
        iterated = list(back)
    finally:
        sys.setprofile(None)
    assert entries == iterated == list(log)
    assert len(entries) == len(log) > 1500
    assert calls == []


_OK_FB = Feedback(content=FeedbackContent(score=1.0, message="m"))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        pytest.param(Observation(content="x").model_copy(update={"type": "Action"}),
                     r"Observation\.type", id="retagged"),
        pytest.param(Action(content="x").model_copy(update={"extra": 1}),
                     r"unknown field `extra`", id="extra-key"),
        pytest.param(Reflection.model_construct(content=b"bytes"), r"Reflection\.content",
                     id="bytes-content"),
        pytest.param(Observation.model_construct(content=FeedbackContent(score=1.0,
                                                                          message="m")),
                     r"Observation\.content", id="model-as-content"),
        pytest.param(_OK_FB.model_copy(update={"content": "text"}), r"Feedback\.content",
                     id="feedback-text"),
        pytest.param(_OK_FB.model_copy(update={"content": FeedbackContent.model_construct(
            score=float("inf"), message="m")}), r"Feedback\.content\.score is inf",
            id="feedback-inf"),
        pytest.param(_OK_FB.model_copy(update={"content": FeedbackContent.model_construct(
            score=1, message="m")}), r"Feedback\.content\.score is the int 1 in a float field",
            id="feedback-int-score-comes-back-float"),
        pytest.param(Observation.model_construct(), r"Observation\.content|`content`",
                     id="missing-field"),
    ],
)
@pytest.mark.parametrize("how", ["append", "extend"])
def test_fast_paths_refuse_what_would_not_load_back(bad: object, message: str,
                                                    how: str) -> None:
    """append and extend (in a batch of valid entries) take only what loads back equal."""
    good = [Observation(content="a"), _OK_FB] * 100
    log = MemoryLog()
    log.extend(good)
    with pytest.raises(ValueError, match=message):
        log.extend([*good, bad, *good]) if how == "extend" else log.append(bad)
    assert len(log) == len(good)
    assert MemoryLog.from_jsonl(log.to_jsonl())[:] == good


@pytest.mark.parametrize("before", [0, 3, 2000], ids=["empty", "short-tail", "sealed"])
@pytest.mark.parametrize("size", [3, 5000], ids=["one-batch", "past-a-seal"])
def test_extend_is_all_or_nothing(before: int, size: int) -> None:
    """A refused entry leaves the log exactly as it was: a retry appends nothing twice."""
    head = [Observation(content=f"head {i}") for i in range(before)]
    more = [Action(content=f"more {i} " + "x" * 40) for i in range(size)]
    log = MemoryLog(head)
    was = log.to_jsonl()
    for bad in ("not an entry", Observation.model_construct(content=b"bytes")):
        with pytest.raises((TypeError, ValueError)):
            log.extend([*more, bad])
        assert len(log) == before
        assert log[:] == head
        assert log.to_jsonl() == was
    log.extend(more)
    assert log.to_jsonl() == MemoryLog([*head, *more]).to_jsonl()
    assert MemoryLog.from_jsonl(log.to_jsonl())[:] == [*head, *more]
