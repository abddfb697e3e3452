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
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import msgspec
import pytest
from pydantic import BaseModel, ConfigDict

from ckptwriter import AgentState, MemoryLog, SyncCheckpointWriter, load_checkpoint
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
