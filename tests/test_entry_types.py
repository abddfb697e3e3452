"""The user's own memory entry types: stored faithfully, refused when they would not be."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from pydantic import BaseModel, ConfigDict

from _s3_util import BUCKET, s3_endpoint  # noqa: F401
from ckptwriter import (
    Action,
    CheckpointCorruptError,
    CheckpointWriter,
    ClassMismatchError,
    Feedback,
    FeedbackContent,
    MemoryLog,
    MemoryTypeMismatchError,
    Observation,
    Reflection,
    SyncCheckpointWriter,
    UnknownEntryTypeError,
    load_checkpoint,
)
from conftest import snapshot

_FROZEN = ConfigDict(frozen=True)


class ToolCall(BaseModel):
    model_config = _FROZEN
    name: str
    arguments: dict[str, Any]


class ChatMessage(BaseModel):
    model_config = _FROZEN
    type: Literal["ChatMessage"] = "ChatMessage"
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] = []
    name: str | None = None


class Note(BaseModel):
    """No `type` field: the class name is the tag."""

    model_config = _FROZEN
    text: str
    tags: tuple[str, ...] = ()


class Blob(BaseModel):
    model_config = _FROZEN
    data: Any


class Span(msgspec.Struct, frozen=True, tag_field="type", tag="Span"):
    start: int
    end: int
    label: str | None = None


class Point(msgspec.Struct, frozen=True):
    """An untagged Struct: the class name is the tag."""

    x: float
    y: float
    history: list[list[float]] | None = None


@dataclasses.dataclass(frozen=True)
class Where:
    file: str
    line: int


@dataclasses.dataclass(frozen=True)
class Step:
    type: Literal["Step"] = "Step"
    n: int = 0
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    where: Where | None = None


class ChatObservation(Observation):
    """The issue's subclass, registered with its own tag."""

    type: Literal["ChatObservation"] = "ChatObservation"  # type: ignore[assignment]
    role: str
    tool_calls: tuple[dict[str, Any], ...] = ()


TYPES = [ChatMessage, Note, Blob, Span, Point, Step, ChatObservation]
ENTRIES: list[Any] = [
    Observation(content="Solve: 2+2=?"),
    ChatMessage(role="user", content="What is 2+2? ☃ ünïcødé 😀"),
    ChatMessage(role="assistant", content="", tool_calls=[
        ToolCall(name="calc", arguments={"expr": "2+2", "opts": {"precision": 2, "x": None}})]),
    ChatMessage(role="tool", name="calc", content="4"),
    Action(content="4"),
    Feedback(content=FeedbackContent(score=1.0, message="Correct!")),
    Note(text="line\nbreak \"quoted\" \\ back", tags=("a", "ß")),
    Blob(data={"nested": [1, 2.5, [True, None, {"k": "v"}]]}),
    Span(start=0, end=3), Span(start=1, end=2, label="名前"),
    Point(x=1.5, y=-2.0), Point(x=0.0, y=1e300, history=[[1.0, 2.0], []]),
    Step(), Step(n=3, scores={"a": 0.5}, where=Where(file="f.py", line=7)),
    ChatObservation(content="2+2?", role="user", tool_calls=({"name": "calc", "args": [1]},)),
    Reflection(content="tools help"),
]


def _url(storage: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if storage == "s3":
        request.getfixturevalue("s3_endpoint")
        return f"s3://{BUCKET}/entry-types-{uuid.uuid4().hex}"
    return str(tmp_path / "ck")


def test_lines_start_with_the_tag() -> None:
    """Every line's first key is `type`, the built-ins' bytes are the guide's."""
    log = MemoryLog(ENTRIES, entry_types=TYPES)
    lines = log.to_jsonl().splitlines()
    assert [next(iter(json.loads(x))) for x in lines] == ["type"] * len(ENTRIES)
    assert [json.loads(x)["type"] for x in lines] == [
        "Observation", "ChatMessage", "ChatMessage", "ChatMessage", "Action", "Feedback",
        "Note", "Blob", "Span", "Span", "Point", "Point", "Step", "Step", "ChatObservation",
        "Reflection"]
    assert lines[0] == b'{"type":"Observation","content":"Solve: 2+2=?"}'
    assert lines[5] == b'{"type":"Feedback","content":{"score":1.0,"message":"Correct!"}}'


@pytest.mark.anyio
@pytest.mark.parametrize("executor", ["thread", "process"])
@pytest.mark.parametrize("storage", ["local", pytest.param("s3", marks=pytest.mark.s3)])
async def test_round_trip_through_a_writer_and_a_resume(
    executor: str, storage: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Every kind comes back as its class, equal, from latest, with retention and a resume."""
    url = _url(storage, tmp_path, request)
    log = MemoryLog(ENTRIES[:8], entry_types=TYPES)
    async with CheckpointWriter(url, keep_last=1, executor=executor) as w:  # type: ignore[arg-type]
        await (await w.submit(snapshot(log, 1))).wait()
        log.extend(ENTRIES[8:])
        await (await w.submit(snapshot(log, 2))).wait()
    loaded = load_checkpoint(f"{url}/latest", entry_types=TYPES)
    assert loaded.runtime.episode_index == 2
    assert [type(e) for e in loaded.memory] == [type(e) for e in ENTRIES]
    assert list(loaded.memory) == ENTRIES
    resumed = loaded.memory
    resumed.append(ChatMessage(role="user", content="and 3+3?"))
    async with CheckpointWriter(url, keep_last=1, executor=executor) as w:  # type: ignore[arg-type]
        await (await w.submit(snapshot(resumed, 3))).wait()
    again = load_checkpoint(url, entry_types=TYPES).memory
    assert list(again) == [*ENTRIES, ChatMessage(role="user", content="and 3+3?")]
    assert again.to_jsonl() == log.to_jsonl() + resumed[-1:][0].model_dump_json(
        exclude_none=False).encode() + b"\n"


def test_subclass_with_its_own_fields_is_refused() -> None:
    """The issue's ChatMessage(Observation) is a TypeError saying how to register it."""

    class Chatty(Observation):
        role: str
        tool_calls: list[dict[str, Any]]

    log = MemoryLog()
    with pytest.raises(TypeError, match=re.escape(
            "Chatty is a subclass of Observation with its own fields (role, tool_calls), "
            "and is not a registered entry type: it would be written as a plain Observation "
            "and come back as one. Register it: give it its own tag (a first field "
            "`type: Literal['Chatty'] = 'Chatty'`) and pass it as "
            "MemoryLog(entry_types=[Chatty]) and load_checkpoint(..., "
            "entry_types=[Chatty])")):
        log.append(Chatty(content="2+2?", role="user", tool_calls=[]))
    assert log.to_jsonl() == b""
    assert len(log) == 0


def test_unregistered_type_is_refused() -> None:
    """An instance of a type not passed in entry_types is a TypeError naming the fix."""
    with pytest.raises(TypeError, match=r"^MemoryLog entries must be one of the registered "
                       r"types \(Observation, Action, Feedback, Reflection\); to store Note "
                       r".*pass it as MemoryLog\(entry_types=\[Note\]\)"):
        MemoryLog().append(Note(text="x"))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param(Observation(content="x").model_copy(update={"content": {"a": 1}}),
                     r"Observation\.content: expected `str`, got `object` \(model_copy",
                     id="builtin-model_copy"),
        pytest.param(Observation.model_construct(content=3),
                     r"Observation\.content: expected `str`, got `int`",
                     id="builtin-model_construct"),
        pytest.param(Observation(content="x").model_copy(update={"type": "Action"}),
                     r"Observation\.type: invalid value 'Action'", id="builtin-retagged"),
        pytest.param(Observation(content="x").model_copy(update={"extra": 1}),
                     r"Observation: object contains unknown field `extra`", id="builtin-extra"),
        pytest.param(ChatMessage(role="user", content="x").model_copy(update={"role": "sys"}),
                     r"ChatMessage\.role: invalid enum value 'sys'", id="user-model_copy"),
        pytest.param(ChatMessage.model_construct(role="user", content="x",
                                                 tool_calls=[{"name": "calc"}]),
                     r"ChatMessage\.tool_calls\[0\]\.arguments: Field required",
                     id="user-nested-model_construct"),
    ],
)
def test_entry_that_skipped_validation_is_refused(entry: Any, message: str) -> None:
    """append refuses what would not load back, naming the field and the problem."""
    log = MemoryLog([Action(content="before")], entry_types=TYPES)
    name = type(entry).__name__
    with pytest.raises(ValueError, match=rf"^cannot append {name} entry: {message}"):
        log.append(entry)
    assert log.to_jsonl() == b'{"type":"Action","content":"before"}\n'
    assert len(MemoryLog.from_jsonl(log.to_jsonl(), entry_types=TYPES)) == 1


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        pytest.param(Feedback(content=FeedbackContent(score=1.0, message="m")).model_copy(
            update={"content": FeedbackContent.model_construct(score=float("nan"),
                                                                message="m")}),
            r"Feedback\.content\.score is nan", id="builtin-score"),
        pytest.param(ChatMessage(role="tool", content="x", tool_calls=[ToolCall(
            name="n", arguments={"v": [1, float("inf")]})]),
            r"ChatMessage\.tool_calls\[0\]\.arguments\['v'\]\[1\] is inf", id="pydantic-nested"),
        pytest.param(Point(x=float("-inf"), y=0.0), r"Point\.x is -inf", id="struct"),
        pytest.param(Step(scores={"a": float("nan")}), r"Step\.scores\['a'\] is nan",
                     id="dataclass"),
        pytest.param(Blob(data=[{"k": float("nan")}]), r"Blob\.data\[0\]\['k'\] is nan",
                     id="any-field"),
    ],
)
def test_nan_and_inf_are_refused_with_their_path(entry: Any, where: str) -> None:
    """A NaN or infinity anywhere in an entry is refused at append, its path named."""
    log = MemoryLog(entry_types=TYPES)
    name = type(entry).__name__
    with pytest.raises(ValueError, match=rf"^cannot append {name} entry: {where}: JSON has "
                       r"no NaN or infinity \(it would be written as null"):
        log.append(entry)
    assert len(log) == 0


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        pytest.param(type("Mutable", (BaseModel,), {"__annotations__": {"x": int}}),
                     r"entries are immutable once appended; declare model_config = "
                     r"ConfigDict\(frozen=True\)", id="not-frozen"),
        pytest.param(type("Late", (BaseModel,), {
            "__annotations__": {"x": int, "type": Literal["Late"]}, "type": "Late",
            "model_config": _FROZEN}), r"declare the `type` field first", id="type-not-first"),
        pytest.param(msgspec.defstruct("Arr", [("x", int)], frozen=True, array_like=True),
                     r"array_like=True has no keys", id="array-like"),
        pytest.param(int, r"entry types are pydantic models, msgspec Structs or dataclasses",
                     id="not-a-model"),
    ],
)
def test_types_that_cannot_be_stored_faithfully_are_refused(cls: Any, message: str) -> None:
    """Registering such a type is a TypeError saying what to change."""
    with pytest.raises(TypeError, match=rf"^cannot use \w+ as a memory entry type: .*{message}"):
        MemoryLog(entry_types=[cls])


def test_two_types_with_one_tag_are_refused() -> None:
    """A subclass inheriting its base's tag is refused: its lines would load as the base."""

    class Inherits(Observation):
        role: str

    with pytest.raises(TypeError, match=r"^Inherits and Observation both have the tag "
                       r"'Observation'; give Inherits its own"):
        MemoryLog(entry_types=[Inherits])


def _write(root: Path, log: MemoryLog, episodes: tuple[int, ...] = (1,)) -> Path:
    with SyncCheckpointWriter(root, executor="thread") as w:
        for ep in episodes:
            w.submit(snapshot(log, ep)).wait()
    return root


def test_a_tag_not_passed_is_a_mismatch_naming_tags_checkpoint_and_fix(tmp_path: Path) -> None:
    """Loading without the classes is UnknownEntryTypeError, also from latest (no fallback)."""
    root = _write(tmp_path / "ck", MemoryLog(ENTRIES[:4], entry_types=TYPES), (1, 2))
    ep2 = root / "ep_000002"
    for where in (ep2, root / "latest"):
        with pytest.raises(UnknownEntryTypeError, match=re.escape(
                f"Memory not restored: checkpoint {ep2} (memory_2.jsonl) holds entries of "
                "type 'ChatMessage' (first on line 2), which no type passed in entry_types= "
                "has as its tag (known: Observation, Action, Feedback, Reflection). Pass the "
                "classes: load_checkpoint(path, entry_types=[ChatMessage]), or read plain "
                "dicts with load_checkpoint(path, raw=True).")) as info:
            load_checkpoint(where)
        assert isinstance(info.value, MemoryTypeMismatchError)
        assert info.value.tags == {"ChatMessage": 2}


def test_raw_mode_reads_plain_dicts_without_the_classes(tmp_path: Path) -> None:
    """raw=True gives every entry as a dict and counts by tag; the log is read-only."""
    log = MemoryLog(ENTRIES, entry_types=TYPES)
    root = _write(tmp_path / "ck", log)
    raw = load_checkpoint(root, raw=True).memory
    assert list(raw) == [json.loads(x) for x in log.to_jsonl().splitlines()]
    assert raw.counts_by_type() == log.counts_by_type()
    assert raw.to_jsonl() == log.to_jsonl()
    with pytest.raises(TypeError, match=r"^this MemoryLog was loaded with raw=True"):
        raw.append(Action(content="x"))


def test_a_line_nested_too_deeply_in_an_any_field_is_a_corrupt_checkpoint(
    tmp_path: Path,
) -> None:
    """Past msgspec's depth limit inside an Any field: CheckpointCorruptError naming the line."""
    root = _write(tmp_path / "ck", MemoryLog([Blob(data=1)], entry_types=TYPES))
    ep = root / "ep_000001"
    deep = b'{"type":"Blob","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    (ep / "memory_1.jsonl").write_bytes(deep)
    rt = json.loads((ep / "runtime.json").read_bytes())
    rt["files"]["memory_1.jsonl"] = {"bytes": len(deep),
                                     "sha256": hashlib.sha256(deep).hexdigest()}
    (ep / "runtime.json").write_text(json.dumps(rt))
    with pytest.raises(CheckpointCorruptError, match=r"memory_1\.jsonl: line 1 is not a valid "
                       r"memory entry: JSON nested too deeply"):
        load_checkpoint(ep, entry_types=TYPES)


def test_a_changed_field_type_fails_on_load_not_later(tmp_path: Path) -> None:
    """A class whose field changed type since the checkpoint is refused when loading, as a
    class mismatch (not damage)."""
    root = _write(tmp_path / "ck", MemoryLog([Span(start=1, end=2)], entry_types=TYPES))

    class Span2(msgspec.Struct, frozen=True, tag_field="type", tag="Span"):
        start: str
        end: int
        label: str | None = None

    with pytest.raises(ClassMismatchError, match=r"\(memory_1\.jsonl, line 1\) holds a 'Span' "
                       r"entry .*: field `start`: the class expects `str` and the entry holds "
                       r"`int`\."):
        load_checkpoint(root / "ep_000001", entry_types=[Span2])


def test_a_loaded_log_builds_entries_when_read(tmp_path: Path) -> None:
    """A large loaded log indexes, slices and iterates equal to what was appended."""
    entries = [ENTRIES[i % len(ENTRIES)] for i in range(5000)]
    log = MemoryLog(entries, entry_types=TYPES)
    back = MemoryLog.from_jsonl(log.to_jsonl(), entry_types=TYPES)
    assert len(back) == 5000
    assert back[4321] == entries[4321]
    assert back[-1] == entries[-1]
    assert back[1000:4000] == entries[1000:4000]
    assert list(back) == entries
    assert back.entry_types == tuple(TYPES)
