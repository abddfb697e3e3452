"""What cannot be stored exactly is refused when it is handed over, naming where and the fix.

Entries (append / extend), state values (AgentState), Snapshot's agent_config and
extra_files: a value that would come back changed, even one that compares equal to what
it would come back as (an enum as its value, a defaultdict as a dict, an int as a float,
a ZoneInfo datetime at a fixed offset), is refused at once, never stored.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import msgspec
import pytest
from pydantic import BaseModel, ConfigDict, Field

from ckptwriter import (
    AgentState,
    CheckpointError,
    ConfigError,
    MemoryLog,
    Snapshot,
    SyncCheckpointWriter,
    load_checkpoint,
)
from ckptwriter.config import load_config
from conftest import snapshot


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Note(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["Note"] = "Note"
    meta: dict[str, Any] = {}
    at: datetime.datetime | None = None
    t: datetime.time | None = None
    color: Color | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    reward: float
    info: Any = None


class Pos(msgspec.Struct, frozen=True):
    x: float
    tags: frozenset[str] = frozenset()


_PARIS = ZoneInfo("Europe/Paris")
_TYPES = [Note, Step, Pos]

_CHANGED = [
    pytest.param(Note(meta={"color": Color.RED}),
                 r"Note\.meta\['color'\] is Color\.RED \(an enum\) in a field that does not "
                 r"declare Color: it would load back as 'red'; declare the field's type as "
                 r"Color, or store Color\.RED\.value", id="str-enum-in-Any"),
    pytest.param(Note(meta={"level": [Level.HIGH]}),
                 r"Note\.meta\['level'\]\[0\] is Level\.HIGH \(an enum\)", id="IntEnum-in-list"),
    pytest.param(Note(meta={"counts": defaultdict(int, a=1)}),
                 r"Note\.meta\['counts'\] is a defaultdict \(a subclass of dict\): it would "
                 r"load back as a plain dict; convert it with dict\(value\)", id="defaultdict"),
    pytest.param(Note(at=datetime.datetime(2024, 6, 1, 9, tzinfo=_PARIS)),
                 r"Note\.at is a datetime in the time zone Europe/Paris: JSON keeps only its "
                 r"UTC offset, so it would load back with the fixed offset UTC\+02:00 .*"
                 r"value\.astimezone\(timezone\.utc\)", id="ZoneInfo-datetime"),
    pytest.param(Note(t=datetime.time(9, 30, tzinfo=_PARIS)),
                 r"Note\.t is a time in the time zone Europe/Paris, which JSON does not keep",
                 id="ZoneInfo-time"),
    pytest.param(Step(reward=1), r"Step\.reward is the int 1 in a float field: it would load "
                 r"back as the float 1\.0; pass float\(1\)", id="dataclass-int-for-float"),
    pytest.param(Step(reward=1.0, info=Color.RED), r"Step\.info is Color\.RED \(an enum\)",
                 id="dataclass-enum-in-Any"),
    pytest.param(Pos(x=2), r"Pos\.x is the int 2 in a float field", id="struct-int-for-float"),
    pytest.param(Pos(x=2.0, tags=frozenset({Color.RED})),
                 r"Pos\.tags item <Color\.RED: 'red'> is Color\.RED \(an enum\)",
                 id="struct-enum-in-set"),
]


@pytest.mark.parametrize(("entry", "message"), _CHANGED)
@pytest.mark.parametrize("how", ["append", "extend"])
def test_entry_that_would_come_back_changed_is_refused(entry: Any, message: str,
                                                        how: str) -> None:
    """An entry equal to, but not the same as, what it would load back as is refused."""
    log = MemoryLog(entry_types=_TYPES)
    with pytest.raises(ValueError, match=rf"^cannot append \w+ entry: {message}"):
        log.append(entry) if how == "append" else log.extend([entry])
    assert len(log) == 0
    assert log.to_jsonl() == b""


@pytest.mark.parametrize(("value", "message"), _CHANGED)
def test_state_model_that_would_come_back_changed_is_refused(value: Any, message: str) -> None:
    """A model state value is refused as an entry would be, with its key named."""
    state = AgentState()
    with pytest.raises(ValueError, match=rf"^state\['k'\]: cannot append \w+ entry: {message}"):
        state["k"] = value
    assert "k" not in state


def test_exact_values_are_kept_exactly(tmp_path: Path) -> None:
    """Declared enums, fixed-offset datetimes and floats load back with their own types."""
    utc = datetime.datetime(2024, 6, 1, 9, tzinfo=datetime.timezone.utc)
    entries = [
        Note(meta={"a": [1, 2.5, None, "x", {"b": True}]}, color=Color.RED, at=utc),
        Note(at="2024-06-01T09:00:00+02:00", t="09:30+02:00"),  # type: ignore[arg-type]
        Step(reward=1.0, info={"k": [1]}),
        Pos(x=2.0, tags=frozenset({"a", "b"})),
    ]
    log = MemoryLog(entries, entry_types=_TYPES)
    state = AgentState(step=Step(reward=0.5))
    with SyncCheckpointWriter(tmp_path) as w:
        w.submit(snapshot(log, 1, state=state)).wait()
    ck = load_checkpoint(tmp_path, entry_types=_TYPES, state_types=[Step])
    assert ck.memory[:] == entries
    assert type(ck.memory[0].color) is Color
    assert ck.memory[1].at.utcoffset() == datetime.timedelta(hours=2)
    assert ck.state["step"] == Step(reward=0.5)


class Mode(str, enum.Enum):
    FAST = "fast"


_NOT_JSON = [
    pytest.param(float("nan"), r"\['v'\] is nan: JSON has no NaN or infinity", id="nan"),
    pytest.param([1.0, float("inf")], r"\['v'\]\[1\] is inf: JSON has no NaN", id="inf"),
    pytest.param((64, 64), r"\['v'\] is a tuple: it would load back as a list", id="tuple"),
    pytest.param({3, 1}, r"\['v'\] is a set: it would load back as a list", id="set"),
    pytest.param(Mode.FAST, r"\['v'\] is Mode\.FAST \(an enum\)", id="enum"),
    pytest.param({1: "a"}, r"\['v'\] has the key 1 \(int\): JSON keys are strings", id="int-key"),
    pytest.param(datetime.datetime(2024, 1, 1), r"\['v'\] is a datetime, which would not load",
                 id="datetime"),
    pytest.param(defaultdict(int), r"\['v'\] is a defaultdict \(a subclass of dict\)",
                 id="defaultdict"),
    pytest.param(b"\x00", r"\['v'\] is bytes inside JSON data", id="nested-bytes"),
    pytest.param("caf\udce9", r"\['v'\] holds '\\udce9' at index 3, a lone surrogate",
                 id="surrogate"),
]


@pytest.mark.parametrize(("value", "message"), _NOT_JSON)
def test_agent_config_that_would_come_back_changed_is_refused(value: Any, message: str) -> None:
    """agent_config is refused at capture, as a state value would be, naming the key."""
    snap = Snapshot(1, 1, "A", MemoryLog(), agent_config={"v": value})
    with pytest.raises(CheckpointError, match=rf"^Snapshot\.agent_config{message}"):
        snap.capture()


@pytest.mark.parametrize(("value", "message"), _NOT_JSON)
def test_extra_file_that_would_come_back_changed_is_refused(tmp_path: Path, value: Any,
                                                            message: str) -> None:
    """An extra file is refused at submit, naming the file and the path inside it."""
    snap = Snapshot(1, 1, "A", MemoryLog(), extra_files={"o.json": {"v": value}})
    with SyncCheckpointWriter(tmp_path) as w:
        with pytest.raises(CheckpointError, match=rf"^extra_files\['o\.json'\]{message}"):
            w.submit(snap)
        w.submit(Snapshot(1, 1, "A", MemoryLog(), extra_files={"o.json": b"ok"})).wait()
    assert load_checkpoint(tmp_path).extra_files == {"o.json": b"ok"}


def test_agent_config_nan_in_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A `.nan` (or a YAML date) under agent.config is refused when the file is loaded."""
    path = tmp_path / "run.yaml"
    path.write_text("agent:\n  config:\n    temperature: .nan\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"agent\.config\['temperature'\] is nan: JSON has no"):
        load_config(path)
    path.write_text("agent:\n  config:\n    since: 2024-01-01\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"agent\.config\['since'\] is a date, .* quote a date"):
        load_config(path)


@pytest.mark.parametrize(("name", "problem"), [
    pytest.param("a\x00b.json", r"holds a NUL character", id="nul"),
    pytest.param("\udcff.json", r"holds '\\udcff' at index 0, a lone surrogate", id="surrogate"),
    pytest.param("字" * 90 + ".json", r"is 275 bytes long in UTF-8", id="too-long-utf8"),
    pytest.param("a" * 256, r"is 256 bytes long in UTF-8", id="too-long"),
    pytest.param("runtime.json", r"is reserved by ckptwriter", id="reserved"),
    pytest.param("../x", r"holds a slash", id="path"),
])
@pytest.mark.parametrize("executor", ["thread", "process"])
def test_extra_file_name_no_file_can_have_is_refused_at_submit(
        tmp_path: Path, name: str, problem: str, executor: str) -> None:
    """A bad extra file name is refused at submit, naming it; the writer goes on working."""
    with SyncCheckpointWriter(tmp_path, executor=executor) as w:
        with pytest.raises(CheckpointError, match=rf"^extra_files name .* {problem}"):
            w.submit(Snapshot(1, 1, "A", MemoryLog(), extra_files={name: b"x"}))
        w.submit(Snapshot(1, 1, "A", MemoryLog(), extra_files={"a" * 255: b"x"})).wait()
    assert list(load_checkpoint(tmp_path).extra_files) == ["a" * 255]


@pytest.mark.parametrize(("field", "message"), [
    pytest.param({"val_score": "0.5"}, r"^Snapshot\.val_score must be a float \(or None\), got "
                 r"'0\.5' \(str\)", id="score-str"),
    pytest.param({"val_score": True}, r"^Snapshot\.val_score must be a float", id="score-bool"),
    pytest.param({"val_score": 10**400}, r"^Snapshot\.val_score is an int too large for a float",
                 id="score-overflow"),
    pytest.param({"agent_type": "A\udce9"}, r"^Snapshot\.agent_type 'A\\udce9' holds '\\udce9' "
                 r"at index 1, a lone surrogate", id="agent_type-surrogate"),
    pytest.param({"agent_config": {"p": "caf\udce9"}}, r"^Snapshot\.agent_config\['p'\] holds",
                 id="config-surrogate"),
])
def test_snapshot_field_that_cannot_be_written_is_refused_clearly(field: dict[str, Any],
                                                                  message: str) -> None:
    """val_score, agent_type and agent_config refusals are CheckpointErrors naming the field."""
    args: dict[str, Any] = {"episode_index": 1, "train_steps_total": 1, "agent_type": "A",
                            "memory": MemoryLog(), **field}
    with pytest.raises(CheckpointError, match=message):
        Snapshot(**args).capture()


class Rec(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["Rec"] = "Rec"
    data: dict[str, Any]


class _Text(str):
    pass


def test_value_no_json_line_holds_is_a_type_error_naming_field_and_fix() -> None:
    """A numpy scalar or a str subclass in an Any field: TypeError with the path and fix."""
    np = pytest.importorskip("numpy")
    log = MemoryLog(entry_types=[Rec])
    with pytest.raises(TypeError, match=r"^cannot append Rec entry: Rec\.data\['r'\]\[0\] is an "
                       r"int64 \(numpy\.int64\), which a JSON line cannot hold: convert it to "
                       r"plain data \(for a numpy value: value\.item\(\)\)"):
        log.append(Rec(data={"r": [np.int64(3)]}))
    with pytest.raises(TypeError, match=r"^cannot append Rec entry: Rec\.data\['r'\] is a "
                       r"float64 \(a subclass of float\).*convert it with float\(value\)$"):
        log.extend([Rec(data={"r": np.float64(0.5)})])
    with pytest.raises(TypeError, match=r"^state\['k'\]: cannot append Rec entry: "
                       r"Rec\.data\['t'\] is a _Text \(a subclass of str\)"):
        AgentState(k=Rec(data={"t": _Text("x")}))
    assert len(log) == 0


@pytest.mark.parametrize(("entry", "advice"), [
    pytest.param({"type": "Observation", "content": "x"},
                 r"got dict, not an entry: build the entry from it, "
                 r"Observation\.model_validate\(d\)$", id="built-in-shaped-dict"),
    pytest.param({"a": 1}, r"got dict, which cannot be an entry type: entries are frozen "
                 r"pydantic models, msgspec Structs or dataclasses; declare one with a field "
                 r"for the dict and pass it as MemoryLog\(entry_types=\[YourEntry\]\)",
                 id="other-dict"),
])
def test_plain_dict_entry_gets_advice_that_works(entry: dict[str, Any], advice: str) -> None:
    """A dict entry is told to build an entry (never to register `dict`)."""
    with pytest.raises(TypeError, match=rf"^MemoryLog entries must be .*; {advice}") as info:
        MemoryLog().append(entry)
    assert "entry_types=[dict]" not in str(info.value)


class _Inner(BaseModel):
    x: int = Field(alias="X")


class _Outer(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["_Outer"] = "_Outer"
    inner: _Inner


def test_nested_alias_is_not_blamed_on_skipped_validation() -> None:
    """A model built normally that cannot load its own JSON is told so, not model_copy."""
    log = MemoryLog(entry_types=[_Outer])
    with pytest.raises(ValueError, match=r"^cannot append _Outer entry: _Outer\.inner\.X: Field "
                       r"required \(_Outer validates as built, but not from the JSON it is "
                       r"written as: a nested model with a field alias"):
        log.append(_Outer(inner=_Inner(X=1)))
    bypassed = _Outer.model_construct(inner={"X": "not an int"})
    with pytest.raises(ValueError, match=r"model_copy\(update=\.\.\.\) and model_construct skip "
                       r"validation"):
        log.append(bypassed)


@pytest.mark.parametrize(("kw", "message"), [
    pytest.param({"memory": MemoryLog(memory_type="h\udce9")},
                 r"^Snapshot\.memory_type \(or the MemoryLog's\) 'h\\udce9' holds", id="memory"),
    pytest.param({"logs": {"chat": MemoryLog(memory_type="h\udce9")}},
                 r"^Snapshot\.logs\['chat'\]\.memory_type 'h\\udce9' holds", id="named-log"),
])
def test_memory_type_json_cannot_hold_is_refused(kw: dict[str, Any], message: str) -> None:
    """A lone surrogate in a log's memory_type is a CheckpointError naming it."""
    args: dict[str, Any] = {"memory": MemoryLog(), **kw}
    with pytest.raises(CheckpointError, match=message):
        Snapshot(1, 1, "A", **args).capture()


class _Counted(BaseModel):
    """A frozen entry with a cached property: its cache lives in __dict__, not a field."""

    model_config = ConfigDict(frozen=True)
    type: Literal["Counted"] = "Counted"
    text: str

    @functools.cached_property
    def words(self) -> int:
        return len(self.text.split())


def test_a_read_cached_property_is_not_a_change(tmp_path: Path) -> None:
    """A cached_property read before append (its value in __dict__, ignored by ==) is
    no difference: appended, set as state and loaded back (found by review: KeyError)."""
    entry = _Counted(text="a b c")
    assert entry.words == 3
    memory = MemoryLog(entry_types=[_Counted])
    memory.append(entry)
    state = AgentState()
    state["note"] = entry
    with SyncCheckpointWriter(tmp_path / "c") as w:
        w.submit(snapshot(memory, 1, state=state)).wait()
    loaded = load_checkpoint(tmp_path / "c", entry_types=[_Counted], state_types=[_Counted])
    assert list(loaded.memory) == [entry]


@pytest.mark.parametrize("score", [
    pytest.param(lambda: __import__("numpy").array(0.5), id="numpy-0d-array"),
    pytest.param(lambda: __import__("numpy").float32(0.5), id="numpy-float32"),
    pytest.param(lambda: 1, id="int"),
])
def test_a_score_float_takes_is_a_score(score: Any) -> None:
    """val_score: anything float() takes as one number (a 0-d array or tensor too)."""
    pytest.importorskip("numpy")
    snap = snapshot(MemoryLog(), 1, val_score=score()).capture()
    assert snap.meta.val_score == float(score())


def test_a_score_of_many_numbers_is_refused() -> None:
    """An array of several numbers is no score: refused at capture, naming the field."""
    np = pytest.importorskip("numpy")
    with pytest.raises(CheckpointError, match=r"^Snapshot\.val_score must be a single number"):
        snapshot(MemoryLog(), 1, val_score=np.array([0.5, 0.6])).capture()


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["Event"] = "Event"
    data: dict[str, Any]


class _Color(enum.Enum):
    RED = "red"


@pytest.mark.parametrize(("data", "where"), [
    pytest.param({"c": _Color.RED}, r"_Event\.data\['c'\] = <_Color\.RED: 'red'>", id="enum"),
    pytest.param({"a": {"b": [1, (2, 3)]}}, r"_Event\.data\['a'\]\['b'\]\[1\] = \(2, 3\)",
                 id="nested-tuple"),
])
def test_a_refused_entry_names_the_innermost_path(data: dict[str, Any], where: str) -> None:
    """The refusal names the key path down to the value, not just the field."""
    memory = MemoryLog(entry_types=[_Event])
    with pytest.raises(ValueError, match=rf"cannot append _Event entry: {where} would load back"):
        memory.append(_Event(data=data))
    assert len(memory) == 0
