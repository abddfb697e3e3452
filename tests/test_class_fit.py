"""A class changed since the checkpoint was written: ClassMismatchError, never a fallback."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict

from _runtime_util import cli, write_config
from ckptwriter import (
    AgentState,
    CheckpointCorruptError,
    CheckpointFallbackWarning,
    ClassMismatchError,
    MemoryLog,
    MemoryTypeMismatchError,
    Observation,
    Snapshot,
    SyncCheckpointWriter,
    load_checkpoint,
)

_FROZEN = ConfigDict(frozen=True)


class Msg(BaseModel):
    """The class the checkpoints are written with."""

    model_config = _FROZEN
    type: Literal["Msg"] = "Msg"
    text: str
    n: int = 0


class Renamed(BaseModel):
    model_config = _FROZEN
    type: Literal["Msg"] = "Msg"
    body: str
    n: int = 0


class Removed(BaseModel):
    model_config = _FROZEN
    type: Literal["Msg"] = "Msg"
    n: int = 0


class Added(BaseModel):
    model_config = _FROZEN
    type: Literal["Msg"] = "Msg"
    text: str
    n: int = 0
    lang: str


class Retyped(BaseModel):
    model_config = _FROZEN
    type: Literal["Msg"] = "Msg"
    text: str
    n: str = "0"


class Grown(BaseModel):
    model_config = _FROZEN
    type: Literal["Msg"] = "Msg"
    text: str
    n: int = 0
    lang: str = "en"


CHANGES = [
    pytest.param(Renamed, r"the class requires the field `body`, which the {noun} lacks, and "
                 r"the {noun} has the field `text`, which the class does not have \(loading "
                 r"would drop it\)", r"rename the field `body` back to `text`, or give the "
                 r"field `body` a default", id="renamed"),
    pytest.param(Removed, r"the {noun} has the field `text`, which the class does not have "
                 r"\(loading would drop it\)", r"add the field `text` back to the class",
                 id="removed"),
    pytest.param(Added, r"the class requires the field `lang`, which the {noun} lacks \(it "
                 r"has the fields `n`, `text`\)", r"give the field `lang` a default",
                 id="added-required"),
    pytest.param(Retyped, r"field `n`: the class expects `str` and the {noun} holds `int`",
                 r"give `n` back the type it was written with, or one that takes both",
                 id="retyped"),
]
PLACES = ["memory", "log", "state"]


def _write(root: Path, place: str) -> None:
    """ep_000001 without Msg; ep_000002 and ep_000003 with one, in ``place``."""
    memory = MemoryLog(entry_types=[Msg])
    log = MemoryLog(entry_types=[Msg])
    state = AgentState()
    with SyncCheckpointWriter(root, fsync=False) as w:
        for ep in (1, 2, 3):
            memory.append(Observation(content=f"obs {ep}"))
            if ep >= 2:
                msg = Msg(text=f"msg {ep}", n=ep)
                if place == "memory":
                    memory.append(msg)
                elif place == "log":
                    log.append(msg)
                else:
                    state["s"] = msg
            w.submit(Snapshot(ep, ep, "A", memory, logs={"l": log}, state=state)).wait()


def _load(path: Path, cls: type) -> Any:
    return load_checkpoint(path, entry_types=[cls], state_types=[cls])


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(("cls", "problem", "fix"), CHANGES)
def test_a_changed_class_is_a_mismatch_naming_the_field_and_the_fix(
    tmp_path: Path, place: str, cls: type, problem: str, fix: str,
) -> None:
    """latest holds a value its class no longer fits: raised, no fallback to ep_000001."""
    _write(tmp_path, place)
    where, section, noun = {
        "memory": (r"memory_3\.jsonl, line 3", "Memory", "entry"),
        "log": (r"log\.l\.jsonl, line 1", "Log 'l'", "entry"),
        "state": (r"state\['s'\], state\.s\.json", "State", "value"),
    }[place]
    ep3 = re.escape(str(tmp_path / "ep_000003"))
    with pytest.raises(ClassMismatchError, match=(
        rf"^{section} not restored: checkpoint {ep3} \({where}\) holds a 'Msg' {noun} that "
        rf"does not fit test_class_fit:{cls.__name__}, the class passed for that tag: "
        rf"{problem.format(noun=noun)}\. It was written by test_class_fit:Msg as that class "
        r"was then \(its fields changed since\); the checkpoint is not damaged .*"
        rf"Fix the class \({fix}\), or migrate the checkpoint: read it with "
        r"load_checkpoint\(path, raw=True\)")) as info:
        _load(tmp_path / "latest", cls)
    assert isinstance(info.value, MemoryTypeMismatchError)
    assert not isinstance(info.value, CheckpointCorruptError)
    assert (info.value.tag, info.value.written_by) == ("Msg", "test_class_fit:Msg")
    assert info.value.cls == f"test_class_fit:{cls.__name__}"


@pytest.mark.parametrize("place", PLACES)
def test_a_class_that_gained_a_defaulted_field_loads(tmp_path: Path, place: str) -> None:
    """Growth with a default is no mismatch: latest loads, the default filled in."""
    _write(tmp_path, place)
    ck = _load(tmp_path / "latest", Grown)
    assert ck.path.name == "ep_000003"
    held = {"memory": lambda: ck.memory[-1], "log": lambda: ck.logs["l"][-1],
            "state": lambda: ck.state["s"]}[place]()
    assert held == Grown(text="msg 3", n=3, lang="en")


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.unlink()  # a file may be shared with the previous checkpoint: never in place
    path.write_bytes(bytes(data))


def test_damage_still_falls_back_with_the_classes_passed(tmp_path: Path) -> None:
    """A damaged latest (sha256 mismatch) falls back to ep_000002, as before."""
    _write(tmp_path, "memory")
    _damage(tmp_path / "ep_000003" / "memory_3.jsonl")
    with pytest.warns(CheckpointFallbackWarning, match=r"^latest points at ep_000003, which is "
                      r"broken \(memory_3\.jsonl: sha256 does not match runtime\.json\)"):
        ck = _load(tmp_path / "latest", Msg)
    assert ck.path.name == "ep_000002"
    assert ck.memory[-1] == Msg(text="msg 2", n=2)


def test_a_fallback_stops_at_a_changed_class(tmp_path: Path) -> None:
    """latest damaged, ep_000002 of a changed class: the mismatch, not ep_000001."""
    _write(tmp_path, "memory")
    _damage(tmp_path / "ep_000003" / "memory_3.jsonl")
    ep2 = re.escape(str(tmp_path / "ep_000002"))
    with pytest.raises(ClassMismatchError, match=rf"^Memory not restored: checkpoint {ep2} "):
        _load(tmp_path / "latest", Renamed)


# -- through `ckptwriter train`, resume_from: auto

_AGENT = '''
from typing import Any, Literal
from pydantic import BaseModel, ConfigDict

class Guess(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["Guess"] = "Guess"
    {field}: str

class GuessAgent:
    entry_types = (Guess,)
    def __init__(self, config: dict[str, Any], memory: Any) -> None:
        self.config, self.memory, self.calls = dict(config), memory, 0
    async def act(self, observation: str) -> str:
        self.calls += 1
        if self.calls > 12:  # guesses from part-way through the run on
            self.memory.append(Guess({field}=observation))
        return "0"
    async def observe(self, feedback: Any) -> None:
        pass
    async def reflect(self) -> None:
        return None
'''
_MODULE = "classfit_guessagent"


@pytest.fixture
def agent_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The agent's module in ``tmp_path``, imported afresh after each rewrite."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    yield tmp_path / f"{_MODULE}.py"
    sys.modules.pop(_MODULE, None)


def _train(cwd: Path, module: Path, field: str, *extra: str) -> int:
    module.write_text(_AGENT.format(field=field), encoding="utf-8")
    sys.modules.pop(_MODULE, None)
    return cli(["train", "--config", "run.yaml", "--quiet", *extra], cwd)


def _lag_latest(ckpts: Path, name: str) -> None:
    """latest left behind on ``name``, as after a crash between commit and pointer move."""
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to(name)
    ptr = json.loads((ckpts / "latest.json").read_text())
    ptr.update(checkpoint=name, episode_index=int(name.removeprefix("ep_")))
    (ckpts / "latest.json").write_text(json.dumps(ptr))


@pytest.mark.parametrize("lagging", [False, True], ids=["latest", "latest-lagging"])
def test_auto_resume_with_a_changed_class_stops_naming_it(
    tmp_path: Path, agent_module: Path, capsys: pytest.CaptureFixture[str], lagging: bool,
) -> None:
    """A renamed field: exit 1 naming the class and fields, nothing rerun or written."""
    write_config(tmp_path, "run", {
        "agent": {"type": f"{_MODULE}:GuessAgent", "memory_type": "guess"},
        "runtime": {"max_envs_to_visit": 20, "checkpoint_every_episodes": 5,
                    "resume_from": "auto", "executor": "thread", "fsync": False}})
    assert _train(tmp_path, agent_module, "text") == 0
    (run,) = (tmp_path / "outputs" / "run").iterdir()
    ckpts = run / "checkpoints"
    if lagging:
        _lag_latest(ckpts, "ep_000005")
    before = sorted(os.listdir(ckpts))
    capsys.readouterr()
    assert _train(tmp_path, agent_module, "body", "--set", "runtime.max_envs_to_visit=30") == 1
    err = capsys.readouterr().err
    ep20 = re.escape(str(Path("outputs", "run", run.name, "checkpoints", "ep_000020")))
    assert re.search(
        rf"^error: Memory not restored: checkpoint {ep20} \(memory_20\.jsonl, line \d+\) holds "
        rf"a 'Guess' entry that does not fit {_MODULE}:Guess, the class passed for that tag: "
        r"the class requires the field `body`, which the entry lacks, and the entry has the "
        r"field `text`", err, re.M), err
    assert "Not saved" not in err
    assert "broken" not in err
    assert sorted(os.listdir(ckpts)) == before
