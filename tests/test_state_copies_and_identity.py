"""What keeps a checkpoint's reused files and state values honest.

Every test here failed once (a review of the AgentState / several-logs work):

- copies of an AgentState (copy.copy, copy.deepcopy, pickle, a fork) never give one
  version to two values, so the writer never links one state's file into another's;
- the process executor sends a frame bigger than its pipe whatever the payload (an
  empty payload is never handed over in a memfd the child would have to map);
- values that would load back as another type (enums, dict/list/str subclasses) or not
  at all (a lone surrogate) are refused when set, naming the key, the path and the fix;
- a reused file edited in place with its mtime put back is not reused (ctime), while the
  writer's own links and retention's unlinks keep reuse working;
- two classes with one tag are refused at capture, and a class that lost fields since a
  checkpoint was written is refused at load instead of dropping them.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import json
import os
import pickle
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from _s3_util import make_backend, s3_endpoint  # noqa: F401
from ckptwriter import (
    AgentState,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointWriter,
    ClassMismatchError,
    Feedback,
    FeedbackContent,
    MemoryLog,
    Observation,
    Snapshot,
    load_checkpoint,
    verify_checkpoint,
)
from ckptwriter.agent_state import _Slot

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _snap(ep: int, mem: MemoryLog, state: AgentState | None = None, **kw: Any) -> Snapshot:
    return Snapshot(ep, ep, "A", mem, state=state, **kw)


# -- 1. process executor: a frame bigger than the pipe with nothing to append -----------


async def test_process_big_extra_file_with_empty_memory_commits(tmp_path: Path) -> None:
    """Regression of the new pipe-or-memfd rule: the frame (which carries extra_files and
    agent.json every time) no longer fits the pipe, the delta is 0 bytes, and the child
    mmaps an empty memfd ("cannot mmap an empty file"). HEAD writes this checkpoint."""
    mem = MemoryLog()
    async with CheckpointWriter(tmp_path, executor="process", fsync=False) as w:
        r = await (await w.submit(_snap(1, mem, extra_files={
            "opt.bin": b"\x07" * (2 << 20)}))).wait()
    assert r.name == "ep_000001"
    assert load_checkpoint(tmp_path).extra_files["opt.bin"] == b"\x07" * (2 << 20)


async def test_process_many_unchanged_keys_commit_again(tmp_path: Path) -> None:
    """Thousands of unchanged keys: only their versions cross, the frame outgrows the
    1 MiB pipe, the payload is empty: the same empty-memfd failure on every second
    checkpoint."""
    mem, state = MemoryLog([Observation(content="o")]), AgentState()
    for i in range(4000):
        state[f"k{i:05d}" + "x" * 55] = i
    async with CheckpointWriter(tmp_path, executor="process", fsync=False) as w:
        await (await w.submit(_snap(1, mem, state))).wait()
        r = await (await w.submit(_snap(2, mem, state))).wait()
    assert r.name == "ep_000002"
    assert load_checkpoint(tmp_path).state["k00007" + "x" * 55] == 7


# -- 2. versions collide between copies of one AgentState -------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
async def test_copied_state_is_not_linked_to_the_originals_file(tmp_path: Path,
                                                                how: str) -> None:
    """A deep copy (or a pickle round trip: multiprocessing, a saved agent) keeps the
    AgentState's id and counter, so the copy's next set gets the very version the
    original's did: the writer links the original's file for another value."""
    state = AgentState({"x": 1})
    fork = copy.deepcopy(state) if how == "deepcopy" else pickle.loads(pickle.dumps(state))
    state["x"] = "original"
    fork["x"] = "fork"
    mem = MemoryLog()
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, mem, state))).wait()
        await (await w.submit(_snap(2, mem, fork))).wait()
    assert load_checkpoint(tmp_path / "ep_000002").state["x"] == "fork"


def test_shallow_copy_is_independent() -> None:
    """copy.copy shares the slots dict: setting a key on the copy sets it on the original."""
    state = AgentState({"x": 1})
    other = copy.copy(state)
    other["y"] = 2
    assert "y" not in state


# -- 3. values that load back as another type -------------------------------------------


class Color(enum.IntEnum):
    RED = 1


class Mode(str, enum.Enum):
    TRAIN = "train"


class Text(str):
    pass


@pytest.mark.parametrize("value", [Color.RED, {"mode": Mode.TRAIN},
                                   defaultdict(list, {"a": [1]}), OrderedDict(a=1),
                                   [1, {"t": Text("x")}], {"f": [1.0, Color.RED]}],
                         ids=["IntEnum", "str-Enum-inside", "defaultdict", "OrderedDict",
                              "str-subclass-deep", "IntEnum-in-list"])
async def test_value_of_a_subclass_is_refused_or_kept(tmp_path: Path, value: Any) -> None:
    """encode_value accepts whatever msgspec encodes and `==` the decoded data: an enum
    (or a dict subclass) passes and comes back as a plain int/str/dict, silently."""
    try:
        state = AgentState({"k": value})
    except TypeError:
        return  # refused at set time, with the fix: fine
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, MemoryLog(), state))).wait()
    back = load_checkpoint(tmp_path).state["k"]
    assert type(back) is type(value)
    if isinstance(value, dict):
        assert [type(v) for v in back.values()] == [type(v) for v in value.values()]


def test_unencodable_str_names_the_key() -> None:
    """A lone surrogate escapes encode_value as a bare UnicodeEncodeError, without the
    key or path the spec asks every refusal to name."""
    with pytest.raises((TypeError, ValueError), match=r"state\['k'\]\['a'\]"):
        AgentState({"k": {"a": "\ud800"}})


# -- 4. a linked source edited in place with its mtime put back ------------------------


@pytest.mark.parametrize("name", ["state.k.json", "memory_1.jsonl"])
async def test_source_edited_in_place_with_mtime_restored_is_not_linked(
        tmp_path: Path, name: str) -> None:
    """The reuse identity is (size, inode, mtime_ns); os.utime puts mtime back, so a file
    of the previous checkpoint edited in place (same size) is still linked (or its
    prefix copied) into the next one, which is then born broken although the writer held
    the right bytes. ctime (which utime cannot set) would tell. (The memory case is the
    pre-existing prefix copy; the state case is the new whole-file link.)"""
    mem, state = MemoryLog([Observation(content="o1")]), AgentState({"k": "a" * 100})
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, mem, state))).wait()
        f = tmp_path / "ep_000001" / name
        st = f.stat()
        fd = os.open(f, os.O_WRONLY)
        os.pwrite(fd, b"Z", 3)
        os.close(fd)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        mem.append(Observation(content="o2"))
        await (await w.submit(_snap(2, mem, state))).wait()
    verify_checkpoint(tmp_path / "ep_000002")
    ck = load_checkpoint(tmp_path / "ep_000002")
    assert ck.state["k"] == "a" * 100
    assert [e.content for e in ck.memory] == ["o1", "o2"]


# -- 5. two logs whose entry types share a tag ------------------------------------------


def _msg_class(with_score: bool, module: str) -> type:
    if with_score:
        class Msg(msgspec.Struct, frozen=True):
            text: str
            score: int = 0
    else:
        class Msg(msgspec.Struct, frozen=True):  # type: ignore[no-redef]
            text: str
    Msg.__module__ = module
    return Msg


async def test_logs_with_different_classes_of_one_tag(tmp_path: Path) -> None:
    """Two logs (or the memory and a log) may declare different classes with the same
    tag (two `Msg` classes of two modules). _agent_document keeps one of them in
    agent.json's entry_types without a word, and load_checkpoint takes one class per tag
    for every log (passing both is a TypeError): the other log's entries load through the
    wrong class, `score` silently dropped. Refusing at capture would be the fix."""
    plain, scored = _msg_class(False, "mod_a"), _msg_class(True, "mod_b")
    la = MemoryLog([plain("a")], entry_types=[plain])
    lb = MemoryLog([scored("b", 5)], entry_types=[scored])
    snap = _snap(1, MemoryLog(), logs={"a": la, "b": lb})
    try:
        snap.capture()
    except CheckpointError:
        return  # refused, naming the tag: fine
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(snap)).wait()
    try:
        ck = load_checkpoint(tmp_path, entry_types=[plain])
    except CheckpointError:
        return
    assert list(ck.logs["b"]) == list(lb)


# -- more of the same classes of defect --------------------------------------------------


def test_refusals_name_the_path_and_the_fix() -> None:
    """The refusal of a subclass value says what it would load back as and how to fix it."""
    with pytest.raises(TypeError, match=r"state\['k'\]\['m'\] is Mode.TRAIN.*Mode.TRAIN.value"):
        AgentState({"k": {"m": Mode.TRAIN}})
    with pytest.raises(TypeError, match=r"state\['k'\] is an OrderedDict.*dict\(value\)"):
        AgentState({"k": OrderedDict(a=1)})
    with pytest.raises(ValueError, match=r"state\['k'\] key .*lone surrogate"):
        AgentState({"k": {"\udc80": 1}})
    deep: list[Any] = [1]
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(TypeError, match="nested too deep"):
        AgentState({"k": deep})
    # Plain values of every JSON type still pass.
    AgentState({"k": {"a": [1, 2.5, None, True, "s", {"b": []}]}})


def test_copies_get_fresh_versions_and_own_slots() -> None:
    """A copy's keys have versions of their own, and sets on either side stay there."""
    state = AgentState({"x": 1})
    for other in (copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert dict(other) == {"x": 1}
        assert other.capture()["x"].version != state.capture()["x"].version
        other["x"] = 2
        assert state["x"] == 1


def test_a_forked_process_gets_versions_of_its_own() -> None:
    """A fork copies every state with its id and counter; the child's versions differ
    anyway (a per-process part drawn again after fork)."""
    state = AgentState({"x": 1})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        state["x"] = "child"
        os.write(w, state.capture()["x"].version.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 200).decode()
    os.close(r)
    state["x"] = "parent"
    assert child
    assert child != state.capture()["x"].version


async def test_a_version_with_bytes_of_another_size_is_not_linked(tmp_path: Path) -> None:
    """The writer's second guard: a version match with bytes of another size is written."""
    a, b = AgentState({"x": "short"}), AgentState({"x": "longer value"})
    # Force a collision the random ids would never make.
    slot = b._slots["x"]
    b._slots["x"] = _Slot(slot.obj, dataclasses.replace(
        slot.item, version=a.capture()["x"].version))
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, MemoryLog(), a))).wait()
        await (await w.submit(_snap(2, MemoryLog(), b))).wait()
    assert load_checkpoint(tmp_path / "ep_000002").state["x"] == "longer value"


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_unchanged_key_stays_linked_across_retention(tmp_path: Path,
                                                           executor: str) -> None:
    """Retention unlinking an older checkpoint's name of a shared file moves its ctime;
    the writer records its own moves, so the next checkpoint still links the file."""
    mem, state = MemoryLog([Observation(content="o")]), AgentState({"big": "x" * 10_000})
    async with CheckpointWriter(tmp_path, executor=executor, fsync=False, keep_last=2) as w:
        for ep in range(1, 6):
            mem.append(Observation(content=f"o{ep}"))
            r = await (await w.submit(_snap(ep, mem, state))).wait()
            if ep > 1:
                assert r.files_linked >= 1
                assert r.bytes_written < 10_000
    assert sorted(p.name for p in tmp_path.glob("ep_*")) == ["ep_000004", "ep_000005"]
    assert (tmp_path / "ep_000005" / "state.big.json").stat().st_nlink == 2
    verify_checkpoint(tmp_path / "ep_000005")


@pytest.mark.parametrize("hand_over", ["read from the loop", "memfd"])
async def test_big_frame_and_big_payload_go_through_the_process(
    tmp_path: Path, hand_over: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame bigger than the pipe with a payload bigger than it too: read from the
    loop's memory by the writer process, or (where it cannot) the memfd path."""
    if hand_over == "memfd":
        from ckptwriter import memory_pull
        monkeypatch.setattr(memory_pull, "supported", lambda: False)
    mem = MemoryLog([Observation(content="x" * 3_000_000)])
    async with CheckpointWriter(tmp_path, executor="process", fsync=False) as w:
        await (await w.submit(_snap(1, mem, extra_files={"opt.bin": b"\x01" * (2 << 20)}))
               ).wait()
        mem.append(Observation(content="y"))
        await (await w.submit(_snap(2, mem, extra_files={"opt.bin": b"\x01" * (2 << 20)}))
               ).wait()
    ck = load_checkpoint(tmp_path)
    assert [e.content[:1] for e in ck.memory] == ["x", "y"]


def _tagged(module: str, *, extra: bool) -> type:
    if extra:
        class Skill(msgspec.Struct, frozen=True):
            name: str
            level: int = 0
    else:
        class Skill(msgspec.Struct, frozen=True):  # type: ignore[no-redef]
            name: str
    Skill.__module__ = module
    return Skill


def test_memory_and_log_or_two_state_keys_sharing_a_tag_are_refused() -> None:
    """The memory and a log, or two state keys, with two classes of one tag."""
    a, b = _tagged("mod_a", extra=False), _tagged("mod_b", extra=True)
    snap = _snap(1, MemoryLog([a("m")], entry_types=[a]),
                 logs={"l": MemoryLog([b("l", 1)], entry_types=[b])})
    with pytest.raises(CheckpointError, match=r"tag 'Skill'.*mod_a.*the memory.*mod_b.*log 'l'"):
        snap.capture()
    state = AgentState({"one": a("x"), "two": b("y", 2)})
    with pytest.raises(CheckpointError, match=r"tag 'Skill'.*state\['one'\].*state\['two'\]"):
        _snap(1, MemoryLog(), state).capture()
    # One class in several places is fine.
    _snap(1, MemoryLog([a("m")], entry_types=[a]),
          logs={"l": MemoryLog([a("l")], entry_types=[a])}, state={"s": a("s")}).capture()


async def test_a_class_that_lost_fields_is_refused_at_load(tmp_path: Path) -> None:
    """agent.json's fingerprint differs from the class passed and the entries hold a
    field it lacks: refused (instead of dropped). A class that gained a field loads."""
    old, new = _tagged("mod", extra=True), _tagged("mod", extra=False)
    log = MemoryLog([old("a", 3)], entry_types=[old])
    mem = MemoryLog([old("m", 4)], entry_types=[old])
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, mem, AgentState({"s": old("s", 5)}),
                                    logs={"l": log}))).wait()
    with pytest.raises(ClassMismatchError, match=r"memory_1.jsonl.*the field `level`.*raw=True"):
        load_checkpoint(tmp_path, entry_types=[new], state_types=[old])
    with pytest.raises(ClassMismatchError, match=r"state\['s'\].*the field `level`"):
        load_checkpoint(tmp_path, entry_types=[old], state_types=[new])
    ck = load_checkpoint(tmp_path, entry_types=[old], state_types=[old])
    assert list(ck.logs["l"]) == list(log)
    assert ck.state["s"] == old("s", 5)
    raw = load_checkpoint(tmp_path, raw=True)
    assert raw.state["s"]["level"] == 5


async def test_a_class_that_gained_a_field_still_loads(tmp_path: Path) -> None:
    """Schema growth (a field with a default) is not refused: nothing would be dropped."""
    old, new = _tagged("mod", extra=False), _tagged("mod", extra=True)
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, MemoryLog([old("m")], entry_types=[old])))).wait()
    assert list(load_checkpoint(tmp_path, entry_types=[new]).memory) == [new("m", 0)]


def _rewrite_agent(ckpt: Path, edit: Any) -> None:
    agent = json.loads((ckpt / "agent.json").read_bytes())
    edit(agent)
    data = json.dumps(agent).encode()
    (ckpt / "agent.json").unlink()
    (ckpt / "agent.json").write_bytes(data)
    runtime = json.loads((ckpt / "runtime.json").read_bytes())
    runtime["files"]["agent.json"] = {"bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "runtime.json").unlink()
    (ckpt / "runtime.json").write_text(json.dumps(runtime))


async def test_reader_names_a_file_named_twice_and_refuses_a_log_named_memory(
        tmp_path: Path) -> None:
    """An agent.json naming one file for two state keys says so; a log named 'memory'
    (which the writer never writes) is refused like the writer refuses it."""
    state = AgentState({"a": 1, "b": 2})
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, MemoryLog(), state,
                                    logs={"chat": MemoryLog([Observation(content="h")])}))
               ).wait()
    ck = tmp_path / "ep_000001"

    def twice(agent: dict[str, Any]) -> None:
        agent["state"]["b"]["file"] = agent["state"]["a"]["file"]

    _rewrite_agent(ck, twice)
    with pytest.raises(CheckpointCorruptError, match=r"names state\.a\.json twice"):
        load_checkpoint(ck)

    def memory_log(agent: dict[str, Any]) -> None:
        agent["state"]["b"]["file"] = "state.b.json"
        agent["logs"]["memory"] = agent["logs"].pop("chat")

    _rewrite_agent(ck, memory_log)
    with pytest.raises(CheckpointCorruptError, match="log named 'memory'"):
        load_checkpoint(ck)


@pytest.mark.parametrize(("entry", "where"), [
    (Observation(content="a\udcff"), "Observation entry.content"),
    (Feedback(content=FeedbackContent(score=1.0, message="\ud800")),
     "Feedback entry.content.message"),
])
def test_a_lone_surrogate_in_a_memory_entry_names_the_field(entry: Any, where: str) -> None:
    """A string UTF-8 cannot hold is a ValueError at append naming the field and the fix,
    not a bare UnicodeEncodeError; the log is left as it was."""
    log = MemoryLog([Observation(content="ok")])
    before = log.to_jsonl()
    with pytest.raises(ValueError, match=re.escape(where) + r".*lone surrogate.*errors='replace'"):
        log.append(entry)
    assert log.to_jsonl() == before
    assert len(log) == 1
