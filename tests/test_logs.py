"""Named logs and agent state end to end: every kind round-trips on both executors, local
and S3, asyncio and trio, with retention running, across a resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from pydantic import BaseModel, ConfigDict

from _s3_util import make_backend
from ckptwriter import (
    AgentState,
    CheckpointError,
    CheckpointWriter,
    MemoryLog,
    Observation,
    Snapshot,
    UnknownEntryTypeError,
    UnknownStateTypeError,
    load_checkpoint,
)

pytestmark = pytest.mark.anyio


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["ChatMessage"] = "ChatMessage"
    role: str
    content: str
    tool_calls: list[dict[str, Any]] = []


class Event(msgspec.Struct, frozen=True):
    name: str
    weight: float | None = None


@dataclasses.dataclass(frozen=True)
class Note:
    text: str
    tags: list[str]


class SkillBook(BaseModel):
    model_config = ConfigDict(frozen=True)
    skills: dict[str, int]
    owner: str | None = None


class Policy(msgspec.Struct, frozen=True):
    weights: list[float]
    name: str


@dataclasses.dataclass(frozen=True)
class Budget:
    left: int
    unit: str


ENTRY_TYPES = [ChatMessage, Event, Note]
STATE_TYPES = [SkillBook, Policy, Budget]


def _grow(mem: MemoryLog, chat: MemoryLog, events: MemoryLog, state: AgentState, ep: int) -> None:
    mem.append(Observation(content=f"obs {ep} ✓"))
    mem.append(ChatMessage(role="user", content=f"mem {ep}"))
    chat.append(ChatMessage(role="user", content=f"{ep}+{ep}? 日本",
                            tool_calls=[{"name": "calc", "args": {"x": ep}}]))
    chat.append(ChatMessage(role="assistant", content=str(2 * ep)))
    if ep % 2:
        events.append(Event(f"e{ep}", weight=ep / 3))
        events.append(Note(f"note {ep}", ["a", "ü"]))
    state["skills"] = {"add": [1, 2, ep], "nested": {"deep": [{"k": "ñ"}], "none": None}}
    state["step"] = ep
    if ep == 1:
        state["blob"] = b"\x00\xffbinary"
        state["book"] = SkillBook(skills={"add": 3}, owner="me")
        state["policy"] = Policy([0.5, -1.25], "greedy")
        state["budget"] = Budget(10, "tokens")
        state["text"] = "unicode ☃ \u2028 line"


def _expect(ck: Any, mem: MemoryLog, chat: MemoryLog, events: MemoryLog,
            state: AgentState) -> None:
    assert list(ck.memory) == list(mem)
    assert list(ck.logs["messages"]) == list(chat)
    assert list(ck.logs["events"]) == list(events)
    assert ck.logs["messages"].to_jsonl() == chat.to_jsonl()
    assert dict(ck.state) == {k: (bytes(v) if isinstance(v, bytearray) else v)
                              for k, v in state.items()}
    assert type(ck.state["book"]) is SkillBook
    assert type(ck.state["policy"]) is Policy
    assert type(ck.state["budget"]) is Budget


def _location(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return make_backend(kind, tmp_path, request).url


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_every_kind_round_trips_with_retention_and_resume(
        executor: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    await round_trip(executor, "local", tmp_path, request)


async def round_trip(executor: str, kind: str, tmp_path: Path,
                     request: pytest.FixtureRequest) -> None:
    """Write 4 (S3: 3) episodes with keep_last=2, load, resume, write 2 more, load."""
    loc = _location(kind, tmp_path, request)
    last = 3 if kind == "s3" else 4  # moto is slow: fewer commits, retention still runs
    mem, state = MemoryLog(entry_types=ENTRY_TYPES), AgentState()
    chat = MemoryLog(entry_types=ENTRY_TYPES, memory_type="chat")
    events = MemoryLog(entry_types=ENTRY_TYPES)
    async with CheckpointWriter(loc, keep_last=2, executor=executor, fsync=False) as w:
        for ep in range(1, last + 1):
            _grow(mem, chat, events, state, ep)
            await (await w.submit(Snapshot(ep, ep, "ChatAgent", mem, state=state,
                                           logs={"messages": chat, "events": events}))).wait()
        assert [r.episode_index for r in w.checkpoints] == [last - 1, last]
    ck = load_checkpoint(loc, entry_types=ENTRY_TYPES, state_types=STATE_TYPES)
    assert ck.runtime.episode_index == last
    assert ck.logs["messages"].memory_type == "chat"
    _expect(ck, mem, chat, events, state)

    # Resume: the loaded logs and state are the ones to go on with.
    mem2, state2 = ck.memory, ck.state
    chat2, events2 = ck.logs["messages"], ck.logs["events"]
    async with CheckpointWriter(loc, keep_last=2, executor=executor, fsync=False) as w:
        for ep in range(last + 1, last + 3):
            _grow(mem2, chat2, events2, state2, ep)
            state2["book"] = SkillBook(skills={"add": ep})
            await (await w.submit(Snapshot(ep, ep, "ChatAgent", mem2, state=state2,
                                           logs={"messages": chat2, "events": events2}))).wait()
    back = load_checkpoint(loc, entry_types=ENTRY_TYPES, state_types=STATE_TYPES)
    assert back.runtime.episode_index == last + 2
    _expect(back, mem2, chat2, events2, state2)
    assert back.state["book"] == SkillBook(skills={"add": last + 2})
    assert len(back.logs["messages"]) == 2 * (last + 2)


async def test_raw_mode_and_missing_classes(tmp_path: Path) -> None:
    mem, chat, events, state = (MemoryLog(entry_types=ENTRY_TYPES),
                                MemoryLog(entry_types=ENTRY_TYPES),
                                MemoryLog(entry_types=ENTRY_TYPES), AgentState())
    _grow(mem, chat, events, state, 1)
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(Snapshot(1, 1, "A", mem, state=state,
                                       logs={"messages": chat, "events": events}))).wait()
    raw = load_checkpoint(tmp_path, raw=True)
    assert raw.state["book"] == {"type": "SkillBook", "skills": {"add": 3}, "owner": "me"}
    assert raw.logs["messages"][0]["role"] == "user"
    with pytest.raises(UnknownStateTypeError) as info:
        load_checkpoint(tmp_path, entry_types=ENTRY_TYPES, state_types=[Policy, Budget])
    msg = str(info.value)
    assert "state['book']" in msg
    assert "test_logs:SkillBook" in msg
    assert "state_types=[SkillBook]" in msg
    assert "raw=True" in msg
    assert isinstance(info.value, UnknownEntryTypeError)
    with pytest.raises(UnknownEntryTypeError, match="ChatMessage"):
        load_checkpoint(tmp_path, state_types=STATE_TYPES)
    agent = json.loads((tmp_path / "ep_000001" / "agent.json").read_bytes())
    assert agent["entry_types"]["ChatMessage"]["class"] == "test_logs:ChatMessage"
    assert len(agent["entry_types"]["Event"]["fingerprint"]) == 16
    assert agent["logs"]["messages"] == {"file": "log.messages.jsonl", "entries": 2,
                                         "memory_type": "history"}
    assert agent["state"]["book"] == {"file": "state.book.json", "kind": "model",
                                      "class": "test_logs:SkillBook", "tag": "SkillBook"}
    assert agent["state"]["blob"] == {"file": "state.blob.bin", "kind": "bytes"}
    assert (tmp_path / "ep_000001" / "state.blob.bin").read_bytes() == b"\x00\xffbinary"
    first = (tmp_path / "ep_000001" / "log.messages.jsonl").read_bytes().splitlines()[0]
    assert first.startswith(b'{"type":"ChatMessage"')


async def test_old_checkpoints_without_sections_load(tmp_path: Path) -> None:
    mem = MemoryLog([Observation(content="x")])
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(Snapshot(1, 1, "A", mem, extra_files={"state.json": {"a": 1}})
                              )).wait()
    agent = json.loads((tmp_path / "ep_000001" / "agent.json").read_bytes())
    assert set(agent) == {"agent_type", "memory_type", "config"}
    ck = load_checkpoint(tmp_path)
    assert ck.logs == {}
    assert len(ck.state) == 0
    assert set(ck.extra_files) == {"state.json"}


@pytest.mark.parametrize("name", ["memory", "a.b", "a/b", "", "-x", "x" * 65])
def test_bad_log_names_refused_at_capture(name: str) -> None:
    with pytest.raises(CheckpointError, match=r"memory|not a valid name"):
        Snapshot(1, 1, "A", MemoryLog(), logs={name: MemoryLog()}).capture()


@pytest.mark.parametrize("name", ["log.x.jsonl", "state.k.json", "state.k.bin",
                                  "memory_3.jsonl", "agent.json"])
def test_reserved_extra_file_names(name: str) -> None:
    with pytest.raises(CheckpointError, match="reserved"):
        Snapshot(1, 1, "A", MemoryLog(), extra_files={name: b"x"}).capture()
    Snapshot(1, 1, "A", MemoryLog(), extra_files={"state.json": {}, "log.txt": b""}).capture()


def test_plain_mapping_state_and_bad_values_at_capture() -> None:
    snap = Snapshot(1, 1, "A", MemoryLog(), state={"k": [1, 2]}).capture()
    assert snap.state["k"].value.data == b"[1,2]"
    with pytest.raises(CheckpointError, match=r"state\['k'\] is a tuple"):
        Snapshot(1, 1, "A", MemoryLog(), state={"k": (1, 2)}).capture()
    with pytest.raises(CheckpointError, match=r"must be a ckptwriter\.MemoryLog"):
        Snapshot(1, 1, "A", MemoryLog(), logs={"m": [1]}).capture()  # type: ignore[dict-item]
