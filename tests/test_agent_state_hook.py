"""The state hook of custom agents: entry types, logs and state saved, and given back on resume.

A custom agent whose behaviour depends on state outside its memory (an RNG, what it
learned from feedback), with its own entry type in its memory and an extra log, resumed
at episode 500, ends at episode 2000 exactly as the uninterrupted run does: memory, log,
state and step count. An agent without the hook works as before; a wrong hook is a
ConfigError before any episode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio
import msgspec
import pytest
from pydantic import BaseModel, ConfigDict

from _runtime_util import EXAMPLES, config, train
from ckptwriter import (
    AgentState,
    CheckpointError,
    ConfigError,
    FeedbackContent,
    MemoryLog,
    Snapshot,
    SyncCheckpointWriter,
    load_checkpoint,
)
from ckptwriter.runtime import HistoryAgent, TrainResult, run_training
from ckptwriter.runtime.environments import parse_task

_MOD = "test_agent_state_hook"


class Hint(BaseModel):
    """The agent's own entry type in its memory."""

    model_config = ConfigDict(frozen=True)
    type: Literal["Hint"] = "Hint"
    question: str
    answer: str


class Thought(msgspec.Struct, frozen=True, tag_field="type", tag="Thought"):
    """An entry of the agent's extra log."""

    question: str
    guess: str
    explored: bool


class SkillAgent:
    """Learns answers from feedback into its state (not its memory), explores at random.

    Its memory gets a ``Hint`` after each wrong answer, but it never reads it: what it
    knows is ``state["known"]``; ``state["rng"]`` drives exploration; ``state["skills"]``
    counts tries and mistakes per operator. Without its state a resumed run differs.
    """

    entry_types: tuple[type, ...] = (Hint, Thought)

    def __init__(self, config: Mapping[str, Any], memory: MemoryLog) -> None:
        self.config = dict(config)
        self.memory = memory
        self.thoughts = MemoryLog(entry_types=(Thought,), memory_type="thoughts")
        self.state = AgentState(rng=int(self.config.get("seed", 7)), known={}, skills={})
        self._question = ""
        self._feedback: FeedbackContent | None = None

    def logs(self) -> Mapping[str, MemoryLog]:
        return {"thoughts": self.thoughts}

    def state_dict(self) -> AgentState | Mapping[str, Any]:
        return self.state

    def load_state_dict(self, state: AgentState, logs: Mapping[str, MemoryLog]) -> None:
        self.state = state
        self.thoughts = logs["thoughts"]

    async def act(self, observation: str) -> str:
        rng = (self.state["rng"] * 1103515245 + 12345) % 2**31
        self.state["rng"] = rng
        explored = rng % 7 == 0
        known = self.state["known"].get(observation)
        parsed = parse_task(observation)
        if known is not None and not explored:
            guess = str(known)
        elif parsed is None:
            guess = "?"
        else:
            guess = str(parsed[0] + parsed[2] + (1 if explored else 0))
        self._question = observation
        self.thoughts.append(Thought(question=observation, guess=guess, explored=explored))
        return guess

    async def observe(self, feedback: FeedbackContent) -> None:
        self._feedback = feedback

    async def reflect(self) -> str | None:
        fb, self._feedback = self._feedback, None
        parsed = parse_task(self._question)
        if fb is None or parsed is None:
            return None
        skills = self.state["skills"]
        op = skills.setdefault(parsed[1], {"tries": 0, "wrong": 0})
        op["tries"] += 1
        if fb.score < 1.0:
            op["wrong"] += 1
            answer = fb.message.rsplit("answer is ", 1)[1].rstrip(".")
            known = dict(self.state["known"], **{self._question: answer})
            self.state["known"] = known
            self.memory.append(Hint(question=self._question, answer=answer))
        self.state["skills"] = skills  # changed in place: set again to be captured
        return "wrong again" if fb.score < 1.0 and op["wrong"] % 5 == 0 else None


class MappingSkillAgent(SkillAgent):
    """The same agent handing over a plain dict (encoded at every checkpoint)."""

    def state_dict(self) -> Mapping[str, Any]:
        return dict(self.state)


class ForgetfulSkillAgent(SkillAgent):
    """Loads nothing back: proves the resume test notices lost state."""

    def load_state_dict(self, state: AgentState, logs: Mapping[str, MemoryLog]) -> None:
        pass


class FlakySkillAgent(SkillAgent):
    """Raises in ``observe`` of its ``fail_at``-th step: its state changed mid-episode."""

    calls = 0

    async def observe(self, feedback: FeedbackContent) -> None:
        FlakySkillAgent.calls += 1
        if FlakySkillAgent.calls == self.config["fail_at"]:
            raise RuntimeError("the tool server went away")
        await super().observe(feedback)


def _train(tmp_path: Path, name: str, agent: str, *overrides: str, **runtime: Any
           ) -> TrainResult:
    runtime.setdefault("checkpoint_every_episodes", 500)
    cfg = config(tmp_path, name, [f"agent.type={_MOD}:{agent}", "agent.memory_type=skills",
                                  "environment.num_tasks=60", *overrides], **runtime)
    return train(cfg)


def _files(ckpt: Path) -> dict[str, bytes]:
    """Every file of a checkpoint but runtime.json (which holds times and paths)."""
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir()) if p.name != "runtime.json"}


def _end(result: TrainResult, episode: int) -> Path:
    assert result.checkpoint_dir is not None
    return result.checkpoint_dir / f"ep_{episode:06d}"


def test_stateful_agent_resumed_at_500_ends_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """Resumed at 500, run to 2000: memory, log, state and steps equal the whole run's."""
    whole = _train(tmp_path, "whole", "SkillAgent", max_envs_to_visit=2000)
    stage1 = _train(tmp_path, "stage1", "SkillAgent", max_envs_to_visit=500)
    resumed = _train(tmp_path, "stage2", "SkillAgent", max_envs_to_visit=2000,
                     resume_from=str(_end(stage1, 500)))
    a, b = _end(whole, 2000), _end(resumed, 2000)
    files = _files(a)
    assert {"memory_2000.jsonl", "log.thoughts.jsonl", "state.rng.json", "state.known.json",
            "state.skills.json", "agent.json"} <= set(files)
    assert _files(b) == files
    assert resumed.train_steps_total == whole.train_steps_total
    types = SkillAgent.entry_types
    ck_a, ck_b = load_checkpoint(a, entry_types=types), load_checkpoint(b, entry_types=types)
    assert list(ck_b.memory) == list(ck_a.memory)
    assert any(isinstance(e, Hint) for e in ck_a.memory)  # its own type, typed back
    assert list(ck_b.logs["thoughts"]) == list(ck_a.logs["thoughts"])
    assert len(ck_a.logs["thoughts"]) == ck_a.runtime.train_steps_total
    assert dict(ck_b.state) == dict(ck_a.state)
    assert ck_a.state["skills"]["*"]["wrong"] > 0
    # The test can fail: an agent that does not take its state back ends elsewhere.
    lost = _train(tmp_path, "lost", "ForgetfulSkillAgent", max_envs_to_visit=2000,
                  resume_from=str(_end(stage1, 500)))
    assert _files(_end(lost, 2000))["memory_2000.jsonl"] != files["memory_2000.jsonl"]


def test_a_plain_mapping_state_works_too(tmp_path: Path) -> None:
    """state_dict() returning a dict: stored and given back as an AgentState."""
    whole = _train(tmp_path, "whole", "MappingSkillAgent", max_envs_to_visit=300,
                   checkpoint_every_episodes=100)
    resumed = _train(tmp_path, "again", "MappingSkillAgent", max_envs_to_visit=300,
                     checkpoint_every_episodes=100, resume_from=str(_end(whole, 100)))
    assert _files(_end(resumed, 300)) == _files(_end(whole, 300))


def test_exception_checkpoint_holds_the_state_of_the_last_completed_episode(
        tmp_path: Path) -> None:
    """The agent raises after its state changed mid-episode: the checkpoint written on the
    exception holds the state (and log) of the last completed episode, byte for byte."""
    FlakySkillAgent.calls = 0
    with pytest.raises(RuntimeError, match="tool server"):
        _train(tmp_path, "flaky", "FlakySkillAgent", "agent.config={fail_at: 70}",
               max_envs_to_visit=80, checkpoint_every_episodes=50)
    (run,) = (tmp_path / "outputs" / "flaky").iterdir()
    saved = sorted((run / "checkpoints").glob("ep_*"))[-1]
    episode = int(saved.name[3:])
    assert episode % 50 != 0  # written on the exception
    whole = _train(tmp_path, "whole", "SkillAgent", max_envs_to_visit=80,
                   checkpoint_every_episodes=1, fsync=False)
    # agent.json differs (agent type and config); memory, log and state do not.
    assert _files(saved) | {"agent.json": b""} == _files(_end(whole, episode)) | {
        "agent.json": b""}
    again = _train(tmp_path, "again", "SkillAgent", max_envs_to_visit=80,
                   checkpoint_every_episodes=80, resume_from=str(saved))
    assert _files(_end(again, 80)) == _files(_end(whole, 80))


class Tally(BaseModel):
    """A model-typed state value (declared in ``state_types``)."""

    model_config = ConfigDict(frozen=True)
    right: int = 0
    wrong: int = 0


class TallyAgent(SkillAgent):
    """SkillAgent that also keeps a Tally model as state, given back as a Tally."""

    state_types = (Tally,)
    restored: ClassVar[list[object]] = []

    def __init__(self, config: Mapping[str, Any], memory: MemoryLog) -> None:
        super().__init__(config, memory)
        self.state["tally"] = Tally()

    def load_state_dict(self, state: AgentState, logs: Mapping[str, MemoryLog]) -> None:
        TallyAgent.restored.append(state["tally"])
        super().load_state_dict(state, logs)

    async def reflect(self) -> str | None:
        fb, t = self._feedback, self.state["tally"]
        if fb is not None:
            self.state["tally"] = (Tally(right=t.right + 1, wrong=t.wrong) if fb.score >= 1.0
                                   else Tally(right=t.right, wrong=t.wrong + 1))
        return await super().reflect()


def test_a_model_state_value_comes_back_as_its_class(tmp_path: Path) -> None:
    """A state value of a class in ``state_types`` is that class again on resume."""
    TallyAgent.restored.clear()
    whole = _train(tmp_path, "whole", "TallyAgent", max_envs_to_visit=200,
                   checkpoint_every_episodes=100)
    resumed = _train(tmp_path, "again", "TallyAgent", max_envs_to_visit=200,
                     checkpoint_every_episodes=100, resume_from=str(_end(whole, 100)))
    [tally] = TallyAgent.restored
    assert isinstance(tally, Tally)
    assert tally.right + tally.wrong == load_checkpoint(
        _end(whole, 100), entry_types=SkillAgent.entry_types, raw=True).runtime.train_steps_total
    assert _files(_end(resumed, 200)) == _files(_end(whole, 200))


class FlakyMappingAgent(FlakySkillAgent, MappingSkillAgent):
    """FlakySkillAgent handing over a plain dict."""


def test_exception_with_a_plain_mapping_state_writes_no_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A plain-mapping state is not kept at each episode's end: on an exception nothing
    is written that could not be resumed faithfully, and the log says why."""
    FlakySkillAgent.calls = 0
    with pytest.raises(RuntimeError, match="tool server"):
        _train(tmp_path, "flaky", "FlakyMappingAgent", "agent.config={fail_at: 70}",
               max_envs_to_visit=80, checkpoint_every_episodes=20)
    (run,) = (tmp_path / "outputs" / "flaky").iterdir()
    assert all(int(c.name[3:]) % 20 == 0 for c in (run / "checkpoints").glob("ep_*"))
    assert "returns a plain mapping, whose state at the end of that episode was not kept" \
        in caplog.text


def test_history_agent_checkpoints_hold_the_guides_three_files(tmp_path: Path) -> None:
    """HistoryAgent learns only from its memory: its state is empty and its checkpoints
    hold exactly the files the guide lists."""
    result = train(config(tmp_path, overrides=["environment.num_tasks=20"],
                          max_envs_to_visit=100, checkpoint_every_episodes=50))
    assert result.checkpoint_dir is not None
    ckpts = sorted(result.checkpoint_dir.glob("ep_*"))
    assert [sorted(p.name for p in c.iterdir()) for c in ckpts] == [
        ["agent.json", "memory_50.jsonl", "runtime.json"],
        ["agent.json", "memory_100.jsonl", "runtime.json"]]
    ck = load_checkpoint(ckpts[-1])
    assert dict(ck.state) == {}
    assert ck.logs == {}


def test_history_agent_resumes_from_a_checkpoint_without_state(tmp_path: Path) -> None:
    """A checkpoint without the lessons (as written before agent state existed): the
    memory is read from its start, and the run ends as the uninterrupted one."""
    whole = train(config(tmp_path, "whole", max_envs_to_visit=400,
                         checkpoint_every_episodes=200))
    ck = load_checkpoint(_end(whole, 200))
    with SyncCheckpointWriter(tmp_path / "old", executor="thread") as writer:
        writer.submit(Snapshot(
            episode_index=200, train_steps_total=ck.runtime.train_steps_total,
            agent_type="HistoryAgent", memory=ck.memory, memory_type="history")).wait()
    assert not list((tmp_path / "old" / "ep_000200").glob("state.*"))
    resumed = train(config(tmp_path, "again", max_envs_to_visit=400,
                           checkpoint_every_episodes=200,
                           resume_from=str(tmp_path / "old" / "ep_000200")))
    a, b = _files(_end(whole, 400)), _files(_end(resumed, 400))
    assert b["memory_400.jsonl"] == a["memory_400.jsonl"]
    assert resumed.train_steps_total == whole.train_steps_total


def _run_example(tmp_path: Path, name: str, agent: str, **runtime: Any) -> TrainResult:
    cfg = config(tmp_path, name, [f"agent.type=my_agent:{agent}", "agent.memory_type=notes"],
                 **runtime)
    return anyio.run(lambda: run_training(cfg, search_dirs=(str(EXAMPLES),)))


def test_an_agent_without_the_hook_works_as_before(tmp_path: Path) -> None:
    """examples/my_agent.py's NotebookAgent (no hook): no state or log files, same resume."""
    whole = _run_example(tmp_path, "whole", "NotebookAgent", max_envs_to_visit=60,
                         checkpoint_every_episodes=30)
    resumed = _run_example(tmp_path, "again", "NotebookAgent", max_envs_to_visit=60,
                           checkpoint_every_episodes=30, resume_from=str(_end(whole, 30)))
    end = _files(_end(whole, 60))
    assert sorted(end) == ["agent.json", "memory_60.jsonl"]
    assert _files(_end(resumed, 60)) == end


def test_the_example_skill_agent_resumes_where_it_left_off(tmp_path: Path) -> None:
    """examples/my_agent.py's SkillAgent: its skills and guesses log survive a resume."""
    whole = _run_example(tmp_path, "whole", "SkillAgent", max_envs_to_visit=300,
                         checkpoint_every_episodes=100)
    resumed = _run_example(tmp_path, "again", "SkillAgent", max_envs_to_visit=300,
                           checkpoint_every_episodes=100, resume_from=str(_end(whole, 100)))
    end = _files(_end(whole, 300))
    assert {"log.guesses.jsonl", "state.skills.json"} <= set(end)
    assert _files(_end(resumed, 300)) == end


# -- a wrong hook is a ConfigError before any episode -------------------------------------


class _Base(SkillAgent):
    pass


class ListState(_Base):
    def state_dict(self) -> Any:
        return [1, 2]


class NoLoad:
    def __init__(self, config: Mapping[str, Any], memory: MemoryLog) -> None:
        self.config, self.memory = dict(config), memory

    def state_dict(self) -> AgentState:
        return AgentState()

    async def act(self, observation: str) -> str:
        return "0"

    async def observe(self, feedback: FeedbackContent) -> None:
        pass

    async def reflect(self) -> str | None:
        return None


class AsyncState(_Base):
    async def state_dict(self) -> AgentState:  # type: ignore[override]
        return self.state


class ShortLoad(_Base):
    def load_state_dict(self, state: AgentState) -> None:  # type: ignore[override]
        pass


class ListLog(_Base):
    def logs(self) -> Any:
        return {"thoughts": [1]}


class DottedLog(_Base):
    def logs(self) -> Mapping[str, MemoryLog]:
        return {"my.thoughts": self.thoughts}


class MemoryNamedLog(_Base):
    def logs(self) -> Mapping[str, MemoryLog]:
        return {"memory": self.thoughts}


class MemoryAsLog(_Base):
    def logs(self) -> Mapping[str, MemoryLog]:
        return {"again": self.memory}


class UndeclaredLogType(_Base):
    entry_types = (Hint,)


class NotATuple(_Base):
    entry_types = Hint  # type: ignore[assignment]


class Unfrozen(BaseModel):
    text: str


class UnfrozenType(_Base):
    entry_types = (Hint, Thought, Unfrozen)


class NanState(_Base):
    def state_dict(self) -> Mapping[str, Any]:
        return {"loss": [1.0, math.nan]}


class UntypedState(TallyAgent):
    state_types = ()


@pytest.mark.parametrize(("agent", "needle"), [
    ("UntypedState", r"UntypedState\.state_dict\(\)\['tally'\] holds a Tally, a model class "
                     r"not in UntypedState\.state_types: add it to the agent class "
                     r"\(state_types = \(Tally,\)\); a resumed run loads the checkpoint's "
                     r"state with those classes"),
    ("ListState", r"ListState\.state_dict\(\) returned list, expected a ckptwriter\.AgentState"),
    ("NoLoad", r"NoLoad defines state_dict\(\) but not load_state_dict\(self, state, logs\)"),
    ("AsyncState", r"AsyncState\.state_dict must be a plain method, not async"),
    ("ShortLoad", r"ShortLoad\.load_state_dict must take \(self, state, logs\)"),
    ("ListLog", r"logs\(\)\['thoughts'\] is a list, expected a ckptwriter\.MemoryLog"),
    ("DottedLog", r"'my\.thoughts' is not a valid name"),
    ("MemoryNamedLog", r"a log named 'memory': that name is the agent's memory itself"),
    ("MemoryAsLog", r"logs\(\)\['again'\] is the agent's memory again"),
    ("UndeclaredLogType", r"holds entry type\(s\) Thought that are not in "
                          r"UndeclaredLogType\.entry_types"),
    ("NotATuple", r"NotATuple\.entry_types must be a tuple of classes"),
    ("UnfrozenType", r"UnfrozenType\.entry_types: .*Unfrozen"),
    ("NanState", r"state_dict\(\) returned a mapping a checkpoint cannot hold: .*loss.*\[1\]"),
])
def test_a_wrong_hook_is_a_config_error_before_any_episode(
        tmp_path: Path, agent: str, needle: str) -> None:
    """Each wrong shape of the hook is named, with the config file, before anything runs."""
    cfg = config(tmp_path, "bad", [f"agent.type={_MOD}:{agent}"], max_envs_to_visit=5)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/bad\.yaml: agent\.type .*{needle}"):
        train(cfg)
    assert not (tmp_path / "outputs").exists()


class BrokenLoad(SkillAgent):
    def load_state_dict(self, state: AgentState, logs: Mapping[str, MemoryLog]) -> None:
        raise KeyError("skills")


def test_load_state_dict_failing_names_the_checkpoint(tmp_path: Path) -> None:
    """load_state_dict raising: a ConfigError naming the agent and the checkpoint."""
    first = _train(tmp_path, "first", "SkillAgent", max_envs_to_visit=20)
    ckpt = _end(first, 20)
    with pytest.raises(ConfigError, match=rf"BrokenLoad\.load_state_dict could not restore "
                       rf"the state of checkpoint {ckpt}: KeyError: 'skills'"):
        _train(tmp_path, "again", "BrokenLoad", max_envs_to_visit=40, resume_from=str(ckpt))


def test_history_agent_ignores_a_foreign_state(tmp_path: Path) -> None:
    """A HistoryAgent resumed from another agent's checkpoint reads its memory instead."""
    agent = HistoryAgent({}, MemoryLog())
    agent.load_state_dict(AgentState(lessons={"read_to": 10**9, "lessons": {}}), {})
    assert agent._cursor == 0
    agent.load_state_dict(AgentState(lessons=[1]), {})
    assert agent._cursor == 0


class LateModel(SkillAgent):
    """Sets a model value its hook does not declare only after the first episode."""

    async def reflect(self) -> str | None:
        self.state["tally"] = Tally(right=1)
        return await super().reflect()


def test_an_undeclared_model_set_later_stops_at_the_first_checkpoint(tmp_path: Path) -> None:
    """Not at start-up, so at the first checkpoint: nothing written, the fix named."""
    with pytest.raises(CheckpointError, match=r"^LateModel\.state_dict\(\)\['tally'\] holds "
                       r"a Tally, a model class not in LateModel\.state_types: add it to the "
                       r"agent class \(state_types = \(Tally,\)\)"):
        _train(tmp_path, "late", "LateModel", max_envs_to_visit=20, checkpoint_every_episodes=10)
    assert not list((tmp_path / "outputs").glob("late/*/checkpoints/ep_*"))


class TallyForgot(TallyAgent):
    state_types = ()


class HintForgot(SkillAgent):
    entry_types = (Thought,)


@pytest.mark.parametrize(("agent", "needle"), [
    pytest.param("TallyForgot", r"holds state\['tally'\], a test_agent_state_hook:Tally \(tag "
                 r"'Tally'\), and no class in TallyForgot\.state_types has that tag: add the "
                 r"class to the agent class \(state_types = \(Tally,\)\)", id="state_types"),
    pytest.param("HintForgot", r"\(memory_100\.jsonl\) holds entries of type 'Hint', and no "
                 r"class in HintForgot\.entry_types has that tag: add the class to the agent "
                 r"class \(entry_types = \(Thought, Hint\)\)", id="entry_types"),
])
def test_resuming_a_class_the_agent_lacks_names_its_class_attribute(
        tmp_path: Path, agent: str, needle: str) -> None:
    """At resume the fix is the agent class's attribute, not load_checkpoint's argument."""
    whole = _train(tmp_path, "whole", "TallyAgent", max_envs_to_visit=100,
                   checkpoint_every_episodes=100)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/again\.yaml: agent\.type "
                       rf"'{_MOD}:{agent}': checkpoint {_end(whole, 100)}.*{needle}; a resumed "
                       r"run loads the checkpoint with those classes") as info:
        _train(tmp_path, "again", agent, max_envs_to_visit=200,
               resume_from=str(_end(whole, 100)))
    assert "load_checkpoint" not in str(info.value)
