"""The decode path of a load: checked in C, built in batches, exactly what was appended.

A load checks every line against msgspec mirrors of the entry types; built-in entries are
then built without validating them again, so the mirrors must refuse every line the
pydantic models refuse (proved line by line here). User pydantic types are validated by
pydantic, a batch per call, from msgspec-decoded values.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator

from ckptwriter import (
    Action,
    CheckpointCorruptError,
    Feedback,
    FeedbackContent,
    MemoryLog,
    Observation,
    Reflection,
    SyncCheckpointWriter,
    UnknownEntryTypeError,
    load_checkpoint,
)
from ckptwriter.cli import main
from ckptwriter.entries import MemoryEntry
from ckptwriter.entry_codec import entry_types
from ckptwriter.entry_schema import codec_for
from conftest import snapshot

_FROZEN = ConfigDict(frozen=True)


class Tool(BaseModel):
    model_config = _FROZEN
    name: str
    arguments: dict[str, Any]


class Chat(BaseModel):
    model_config = _FROZEN
    type: Literal["Chat"] = "Chat"
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[Tool] = []
    name: str | None = None


class Stamped(BaseModel):
    """No `type` field (the class name is the tag), values msgspec decodes to objects."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    at: datetime.datetime
    id: uuid.UUID
    amount: decimal.Decimal
    data: bytes
    score: float = 0.5
    note: str | None = None


class StrictChat(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True)
    type: Literal["StrictChat"] = "StrictChat"
    n: int
    words: list[str]


class Tagged(BaseModel):
    """A tuple field: to_builtins would make it a list, so it is built entry by entry."""

    model_config = _FROZEN
    tags: tuple[str, ...] = ()


class Span(msgspec.Struct, frozen=True, tag_field="type", tag="Span"):
    start: int
    end: int
    label: str | None = None


class Point(msgspec.Struct, frozen=True):
    x: float
    y: float
    history: list[list[float]] | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    type: Literal["Step"] = "Step"
    n: int = 0
    scores: dict[str, float] = dataclasses.field(default_factory=dict)


TYPES = [Chat, Stamped, StrictChat, Tagged, Span, Point, Step]


def _entries(n: int) -> list[Any]:
    """``n`` entries of every kind, interleaved; unicode, nesting, optionals, defaults."""
    out: list[Any] = []
    for i in range(n):
        k = i % 11
        out.append([
            Observation(content=f"step {i}: ünïcødé ☃ 😀 \"quoted\"\n"),
            Action(content=f"act {i}"),
            Feedback(content=FeedbackContent(score=i / 7, message=f"fb {i}")),
            Reflection(content=f"lesson {i}"),
            Chat(role="assistant", content="", tool_calls=[
                Tool(name="calc", arguments={"expr": f"{i}*2", "opts": [1, None, {"x": 2.5}]})]),
            Chat(role="tool", name="calc", content=str(i * 2)),
            Stamped(at=datetime.datetime(2024, 1, 2, 3, 4, 5, i % 1000,
                                         tzinfo=datetime.timezone.utc),
                    id=uuid.UUID(int=i), amount=decimal.Decimal(f"{i}.25"),
                    data=bytes([i % 256, 0, 255]), note=None if i % 2 else "n"),
            StrictChat(n=i, words=["a", f"w{i}"]),
            Tagged(tags=("a", f"t{i}")),
            Span(start=i, end=i + 1, label=None if i % 3 else "名前"),
            Point(x=i * 0.5, y=-1.0, history=[[1.0, 2.0], []]) if i % 2 else Step(n=i),
        ][k])
    return out


def _write(root: Path, log: MemoryLog) -> Path:
    with SyncCheckpointWriter(root, executor="thread") as w:
        w.submit(snapshot(log, 1)).wait()
    return root / "ep_000001"


def _replace_memory(ep: Path, data: bytes) -> None:
    """Put ``data`` in the memory file, with runtime.json's checksum to match."""
    (ep / "memory_1.jsonl").write_bytes(data)
    rt = json.loads((ep / "runtime.json").read_bytes())
    rt["files"]["memory_1.jsonl"] = {"bytes": len(data),
                                     "sha256": hashlib.sha256(data).hexdigest()}
    (ep / "runtime.json").write_text(json.dumps(rt))


# -- built-in entries are built without validation: the mirrors refuse what pydantic does


_LINES = [
    b'{"type":"Observation","content":"x"}',
    b'{"content":"x","type":"Observation"}',
    b'{"type":"Observation","content":"x","extra":1}',
    b'{"type":"Observation"}',
    b'{"type":"Observation","content":1}',
    b'{"type":"Observation","content":null}',
    b'{"type":"Observation","content":["x"]}',
    b'{"type":"Observation","content":{"a":1}}',
    b'{"type":"Observation","content":true}',
    b'{"type":"Observation","content":1.5}',
    b'{"type":"Observation","content":"\\ud800"}',
    b'{"type":"Observation","content":"\\u00e9\\n\\"q\\""}',
    b'{"type":"Observation","content":"x","content":"y"}',
    b'{"type":"Observation","Content":"x"}',
    b'{"type":"observation","content":"x"}',
    b'{"type":1,"content":"x"}',
    b'{"type":null,"content":"x"}',
    b'{"content":"x"}',
    b'{"type":"Action","content":""}',
    b'{"type":"Reflection","content":"r","type":"Reflection"}',
    b'{"type":"Feedback","content":{"score":1.0,"message":"m"}}',
    b'{"type":"Feedback","content":{"message":"m","score":-0.0}}',
    b'{"type":"Feedback","content":{"score":1,"message":"m"}}',
    b'{"type":"Feedback","content":{"score":1e308,"message":"m"}}',
    b'{"type":"Feedback","content":{"score":1e309,"message":"m"}}',
    b'{"type":"Feedback","content":{"score":-1e999,"message":"m"}}',
    b'{"type":"Feedback","content":{"score":123456789012345678901234567890,"message":"m"}}',
    b'{"type":"Feedback","content":{"score":"nan","message":"m"}}',
    b'{"type":"Feedback","content":{"score":"inf","message":"m"}}',
    b'{"type":"Feedback","content":{"score":null,"message":"m"}}',
    b'{"type":"Feedback","content":{"score":1.0}}',
    b'{"type":"Feedback","content":{"message":"m"}}',
    b'{"type":"Feedback","content":{"score":1.0,"message":"m","x":2}}',
    b'{"type":"Feedback","content":{"score":1.0,"message":5}}',
    b'{"type":"Feedback","content":"good"}',
    b'{"type":"Feedback","content":[1.0,"m"]}',
    b'{"type":"Feedback","content":null}',
    b'{"type":"Feedback"}',
    b'{"type":"Feedback","content":{"score":1.0,"message":"m"},"extra":null}',
    b'{}',
    b'[]',
    b'"Observation"',
    b'null',
    b'{"type":"Observation","content":"x"} {"a":1}',
]
# Lines pydantic takes and the loader refuses (stricter, never the reverse): a score
# written as a string or a bool (lax pydantic coerces it), and a line with two different
# `type` keys (pydantic keeps the last). ckptwriter never writes them.
_STRICTER = [
    (b'{"type":"Feedback","content":{"score":"1.0","message":"m"}}', "Expected `float`"),
    (b'{"type":"Feedback","content":{"score":true,"message":"m"}}', "Expected `float`"),
    (b'{"type":"Observation","type":"Action","content":"x"}', "Invalid value 'Action'"),
    (b'{"type":"Action","content":{"score":1.0,"message":"m"},"type":"Feedback"}',
     "Expected `str`, got `object`"),
]
_PYDANTIC: TypeAdapter[Any] = TypeAdapter(MemoryEntry)


@pytest.mark.parametrize("line", _LINES, ids=lambda b: b.decode()[:60])
def test_a_builtin_line_loads_exactly_when_pydantic_validates_it(line: bytes) -> None:
    """Refused by the models -> refused by the load; taken by both -> the same entry."""
    try:
        want = _PYDANTIC.validate_json(line)
    except ValidationError:
        with pytest.raises((ValueError, UnknownEntryTypeError),
                           match=r"line 1 is not a valid memory entry|holds entries of type"):
            MemoryLog.from_jsonl(line + b"\n")
        return
    got = MemoryLog.from_jsonl(line + b"\n")[0]
    assert got == want
    assert type(got) is type(want)
    assert repr(got) == repr(want)
    if isinstance(got, Feedback):
        assert type(got.content.score) is float


@pytest.mark.parametrize(("line", "problem"), _STRICTER)
def test_the_loader_is_stricter_than_pydantic_only_where_listed(line: bytes,
                                                                problem: str) -> None:
    """Taken by pydantic, refused by the load with the line: only these."""
    _PYDANTIC.validate_json(line)
    with pytest.raises(ValueError, match=rf"^line 1 is not a valid memory entry: "
                       rf"{re.escape(problem)}"):
        MemoryLog.from_jsonl(line + b"\n")


# -- every kind round-trips


def test_every_kind_round_trips_equal_through_a_checkpoint(tmp_path: Path) -> None:
    """Thousands of entries of every kind (many decode batches, mixed in each): equal,
    of the same classes, by iteration, slicing and indexing; bytes kept as written."""
    entries = _entries(6000)
    log = MemoryLog(entries, entry_types=TYPES)
    assert log.nbytes > 4 * 64 * 1024  # several batches
    back = load_checkpoint(_write(tmp_path / "ck", log), entry_types=TYPES).memory
    assert len(back) == len(entries)
    assert [type(e) for e in back] == [type(e) for e in entries]
    assert list(back) == entries
    assert back[:] == entries
    assert back[1234:4321] == entries[1234:4321]
    assert [back[i] for i in (0, 7, 4095, 5999, -1)] == [entries[i] for i in (0, 7, 4095, 5999,
                                                                              -1)]
    assert back.to_jsonl() == log.to_jsonl()
    assert back.counts_by_type() == log.counts_by_type()
    # Values msgspec decodes to objects stay objects (not the strings JSON holds).
    stamped = next(e for e in back if isinstance(e, Stamped))
    assert type(stamped.at) is datetime.datetime
    assert type(stamped.data) is bytes
    # The loaded log goes on appending, and loads back again.
    back.append(Chat(role="user", content="more"))
    assert list(MemoryLog.from_jsonl(back.to_jsonl(), entry_types=TYPES)) == [
        *entries, Chat(role="user", content="more")]


def test_a_batch_build_gives_what_one_by_one_gives() -> None:
    """The one-call build of a pydantic class equals the per-entry one, fields set too;
    it is used only where msgspec hands the values on as decoded."""
    types = entry_types(TYPES)
    for cls in (Chat, Stamped, StrictChat):
        codec = codec_for(cls)
        assert codec.build_many is not None, cls
        lines = [e for e in _entries(200) if type(e) is cls]
        mirrors = [types.decoder.decode(MemoryLog([e], entry_types=TYPES).to_jsonl())
                   for e in lines]
        one = [codec.build(m) for m in mirrors]
        many = codec.build_many(mirrors)
        assert many == one == lines
        assert [e.model_fields_set for e in many] == [e.model_fields_set for e in one]
    assert codec_for(Tagged).build_many is None  # a tuple would come back a list


def test_a_value_the_class_refuses_on_build_names_the_source() -> None:
    """A line the mirror takes but the class refuses (a validator added since): ValueError
    when it is built, naming the source (msgspec cannot run a validator on load)."""

    class Chat2(BaseModel):  # a validator added since the file was written
        model_config = _FROZEN
        type: Literal["Chat"] = "Chat"
        role: Literal["system", "user", "assistant", "tool"]
        content: str
        tool_calls: list[Tool] = []
        name: str | None = None

        @field_validator("content")
        @classmethod
        def _not_a_number(cls, v: str) -> str:
            if v.isdigit():
                raise ValueError("content is a number")
            return v

    data = MemoryLog([Chat(role="tool", content="4")], entry_types=[Chat]).to_jsonl()
    log = MemoryLog.from_jsonl(data, entry_types=[Chat2], source="checkpoint X")
    with pytest.raises(ValueError, match=r"^checkpoint X: an entry no longer fits its class"):
        log[0]


# -- bad lines, unknown tags


@pytest.mark.parametrize(("bad", "problem"), [
    (b'{"type":"Observation","content":3}', "Expected `str`, got `int` - at `$.content`"),
    (b'{"type":"Chat","role":"robot","content":"x"}', "Invalid enum value 'robot' - at `$.role`"),
    (b'{"type":"Span","start":"0","end":1}', "Expected `int`, got `str` - at `$.start`"),
    (b'{"type":"Feedback","content":{"score":1e999,"message":"m"}}',
     "Number out of range - at `$.content.score`"),
    (b'{"type":"Observation","content":"x"', "truncated"),
    (b'not json', "malformed"),
])
def test_a_bad_line_is_a_corrupt_checkpoint_naming_the_file_and_line(
    tmp_path: Path, bad: bytes, problem: str,
) -> None:
    """Line 4500 of a large memory replaced (checksum updated): refused at load, by number."""
    log = MemoryLog(_entries(6000), entry_types=TYPES)
    ep = _write(tmp_path / "ck", log)
    lines = log.to_jsonl().splitlines(keepends=True)
    lines[4499] = bad + b"\n"
    _replace_memory(ep, b"".join(lines))
    with pytest.raises(CheckpointCorruptError) as info:
        load_checkpoint(ep, entry_types=TYPES)
    msg = str(info.value)
    assert "memory_1.jsonl" in msg
    assert str(ep) in msg
    assert "line 4500 is not a valid memory entry: " in msg
    assert problem.lower() in msg.lower()


def test_unknown_tags_name_every_tag_its_first_line_and_the_fix(tmp_path: Path) -> None:
    """Two tags not passed: both named with their first line, and what to pass."""
    ep = _write(tmp_path / "ck", MemoryLog(_entries(30), entry_types=TYPES))
    with pytest.raises(UnknownEntryTypeError) as info:
        load_checkpoint(ep, entry_types=[Chat, Stamped, StrictChat, Tagged, Step])
    msg = str(info.value)
    assert info.value.tags == {"Span": 10, "Point": 22}
    assert "'Span' (first on line 10)" in msg
    assert "'Point' (first on line 22)" in msg
    assert re.search(r"entry_types=\[(Span, Point|Point, Span)\]", msg)
    assert "load_checkpoint(path, raw=True)" in msg


# -- without the classes


def test_raw_mode_gives_plain_dicts_of_every_kind(tmp_path: Path) -> None:
    """raw=True needs no class: each line as its JSON, counted by tag, bytes as written."""
    log = MemoryLog(_entries(3000), entry_types=TYPES)
    raw = load_checkpoint(_write(tmp_path / "ck", log), raw=True).memory
    assert list(raw) == [json.loads(x) for x in log.to_jsonl().splitlines()]
    assert raw[-1] == json.loads(log.to_jsonl().splitlines()[-1])
    assert raw.counts_by_type() == log.counts_by_type()
    assert raw.to_jsonl() == log.to_jsonl()


def test_show_works_without_the_user_classes(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`ckptwriter show` counts every tag, and names a tag's class when agent.json has it."""
    ep = _write(tmp_path / "ck", MemoryLog(_entries(22), entry_types=TYPES))
    agent = json.loads((ep / "agent.json").read_bytes())
    agent["entry_types"] = {"Chat": {"class": "myagent:Chat", "fingerprint": "0" * 16}}
    data = json.dumps(agent).encode()
    (ep / "agent.json").write_bytes(data)
    rt = json.loads((ep / "runtime.json").read_bytes())
    rt["files"]["agent.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ep / "runtime.json").write_text(json.dumps(rt))
    assert main(["show", str(ep)]) == 0
    out = capsys.readouterr().out
    assert "memory (memory_1.jsonl): 22 entries" in out
    assert re.search(r"^  Chat +4  \(myagent:Chat\)$", out, re.M), out
    for tag, n in (("Observation", 2), ("Feedback", 2), ("Span", 2), ("Point", 1),
                   ("Step", 1), ("Stamped", 2)):
        assert re.search(rf"^  {tag} +{n}$", out, re.M), (tag, out)
    assert '"class": "myagent:Chat"' in out


@pytest.mark.parametrize("types", [[], TYPES])
def test_a_batch_of_blank_lines_reads_as_nothing(types: list[type]) -> None:
    """A foreign file with more than a batch of blank lines: the entries around them."""
    entries = [Action(content="a"), Chat(role="user", content="x")] if types else [
        Action(content="a")]
    line = MemoryLog(entries, entry_types=types).to_jsonl()
    log = MemoryLog.from_jsonl(b"\n" * 70_000 + line + b"  \n" * 30_000 + line,
                               entry_types=types)
    assert list(log) == entries * 2
    assert log.counts_by_type() == {"Action": 2, **({"Chat": 2} if types else {})}
