"""AgentState: a mapping whose values are encoded once, when set; what it refuses and why."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import msgspec
import pytest
from pydantic import BaseModel, ConfigDict

from ckptwriter import AgentState, Observation


class SkillBook(BaseModel):
    model_config = ConfigDict(frozen=True)
    skills: dict[str, int]


class TaggedBook(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["TaggedBook"] = "TaggedBook"
    skills: dict[str, int]


class BiggerBook(TaggedBook):
    extra: str = ""


class ChatMessage(Observation):
    role: str = "user"


class Loose(BaseModel):
    skills: dict[str, int]


class Point(msgspec.Struct, frozen=True):
    x: float


@dataclasses.dataclass(frozen=True)
class Cell:
    v: float


def test_mapping_behaviour_and_same_object_back() -> None:
    value = {"add": [1, 2, 3]}
    s = AgentState({"a": 1}, b=2)
    s["skills"] = value
    assert s["skills"] is value
    assert list(s) == ["a", "b", "skills"]
    assert len(s) == 3
    assert "a" in s
    del s["a"]
    assert "a" not in s
    assert dict(s) == {"b": 2, "skills": value}
    assert s.encoded("skills") == b'{"add":[1,2,3]}'
    assert "skills" in repr(s)


def test_versions_change_on_every_set_and_capture_is_references() -> None:
    s = AgentState()
    s["k"] = {"x": 1}
    first = s.capture()
    again = s.capture()
    assert first["k"] is again["k"]  # nothing encoded or copied at capture
    s["k"] = {"x": 1}
    assert s.capture()["k"].version != first["k"].version
    other = AgentState({"k": {"x": 1}})
    assert other.capture()["k"].version != first["k"].version


def test_in_place_mutation_is_not_captured_until_set_again() -> None:
    s = AgentState()
    v = {"n": 1}
    s["k"] = v
    v["n"] = 2
    assert s.capture()["k"].value.data == b'{"n":1}'
    s["k"] = v
    assert s.capture()["k"].value.data == b'{"n":2}'


def test_kinds_and_files() -> None:
    s = AgentState()
    s["data"] = {"ü": ["ñ", None, True, 1.5]}
    s["blob"] = bytearray(b"\x00\x01")
    s["book"] = SkillBook(skills={"a": 1})
    s["pt"] = Point(1.5)
    s["cell"] = Cell(2.0)
    s["obs"] = Observation(content="hi")
    items = s.capture()
    assert {k: (i.file, i.value.kind) for k, i in items.items()} == {
        "data": ("state.data.json", "json"), "blob": ("state.blob.bin", "bytes"),
        "book": ("state.book.json", "model"), "pt": ("state.pt.json", "model"),
        "cell": ("state.cell.json", "model"), "obs": ("state.obs.json", "model")}
    assert items["book"].value.data == b'{"type":"SkillBook","skills":{"a":1}}'
    assert items["book"].value.cls == "test_agent_state:SkillBook"
    assert items["blob"].value.data == b"\x00\x01"


@pytest.mark.parametrize("key", ["", "a.b", "a/b", "-a", "_a", "x" * 65, "sp ace", 3, None])
def test_bad_keys(key: Any) -> None:
    with pytest.raises(ValueError, match=r"not a valid name.*no dots, no slashes"):
        AgentState()[key] = 1


@pytest.mark.parametrize(("value", "where", "fix"), [
    ((1, 2), r"state\['k'\] is a tuple", "pass a list"),
    ({"a": [1, (2,)]}, r"state\['k'\]\['a'\]\[1\] is a tuple", "pass a list"),
    ({1: "x"}, r"state\['k'\] has the key 1 \(int\)", r"str\(key\)"),
    ({"s": {1, 2}}, r"state\['k'\]\['s'\] is a set", "sorted list"),
    ({"m": SkillBook(skills={})}, r"state\['k'\]\['m'\] is a SkillBook inside JSON data",
     "model_dump"),
    ([object()], r"state\['k'\]\[0\] is an object", "JSON data"),
    ({"b": b"x"}, r"state\['k'\]\['b'\] is bytes inside JSON data", "value of its own"),
])
def test_values_that_would_not_load_back_equal(value: Any, where: str, fix: str) -> None:
    s = AgentState()
    with pytest.raises(TypeError, match=where) as info:
        s["k"] = value
    assert fix.replace("\\", "") in str(info.value).replace("\\", "")
    assert "k" not in s


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_named_with_its_path(bad: float) -> None:
    s = AgentState()
    with pytest.raises(ValueError, match=r"state\['skills'\]\['add'\]\[2\] is .*no NaN"):
        s["skills"] = {"add": [1.0, 2.0, bad]}
    with pytest.raises(ValueError, match=r"state\['pt'\].*Point.x is"):
        s["pt"] = Point(bad)
    with pytest.raises(ValueError, match=r"state\['cell'\].*Cell.v is"):
        s["cell"] = Cell(bad)
    assert len(s) == 0


def test_validation_bypass_refused() -> None:
    s = AgentState()
    bad = SkillBook(skills={"a": 1}).model_copy(update={"skills": {"a": "not an int"}})
    with pytest.raises(ValueError, match=r"state\['book'\].*SkillBook.*skip validation"):
        s["book"] = bad
    forged = SkillBook.model_construct(skills=[1, 2])
    with pytest.raises(ValueError, match=r"state\['book'\].*model_construct"):
        s["book"] = forged


def test_subclass_sharing_its_base_tag_refused() -> None:
    s = AgentState()
    with pytest.raises(TypeError, match=r"state\['b'\].*BiggerBook is a subclass of TaggedBook "
                                        r"with its own fields \(extra\)"):
        s["b"] = BiggerBook(skills={})
    with pytest.raises(TypeError, match=r"state\['c'\].*(ChatMessage|tag)"):
        s["c"] = ChatMessage(content="x")
    s["t"] = TaggedBook(skills={"a": 1})  # the base itself is fine


def test_unfrozen_model_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"state\['l'\].*frozen=True"):
        AgentState()["l"] = Loose(skills={})
