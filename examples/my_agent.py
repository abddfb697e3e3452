"""Custom agents for `agent.type: my_agent:NotebookAgent` (see custom_agent.yaml).

They implement ckptwriter.runtime.Agent: built as NotebookAgent(config, memory), with
async act/observe/reflect. The runtime appends Observation/Action/Feedback/Reflection
to `self.memory`; the agent only reads it. An LLM agent has the same shape: build the
prompt from `self.memory` in act(), return the model's answer.

`SkillAgent` (`agent.type: my_agent:SkillAgent`) also keeps state outside its memory
through the state hook (entry_types, logs, state_dict, load_state_dict), so a resumed
run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ckptwriter import AgentState, FeedbackContent, MemoryLog, Reflection


class NotebookAgent:
    """Answers from its notes (Reflections in memory); otherwise guesses `default`."""

    def __init__(self, config: Mapping[str, Any], memory: MemoryLog) -> None:
        self.config = dict(config)
        self.memory = memory
        self._question = ""
        self._feedback: FeedbackContent | None = None

    def _notes(self) -> dict[str, str]:
        notes: dict[str, str] = {}
        for entry in self.memory:
            if isinstance(entry, Reflection) and " => " in entry.content:
                question, answer = entry.content.split(" => ", 1)
                notes[question] = answer
        return notes

    async def act(self, observation: str) -> str:
        self._question = observation
        return self._notes().get(observation, str(self.config.get("default", "0")))

    async def observe(self, feedback: FeedbackContent) -> None:
        self._feedback = feedback

    async def reflect(self) -> str | None:
        fb, self._feedback = self._feedback, None
        if fb is None or fb.score >= 1.0 or "answer is " not in fb.message:
            return None
        answer = fb.message.rsplit("answer is ", 1)[1].rstrip(".")
        return f"{self._question} => {answer}"


class Guess(BaseModel):
    """One entry of SkillAgent's `guesses` log: its own entry type."""

    model_config = ConfigDict(frozen=True)
    type: Literal["Guess"] = "Guess"
    question: str
    answer: str
    from_skill: bool


class SkillAgent:
    """Learns the right answers from feedback into its state, and logs every guess.

    Its skills (question -> answer) are not in its memory: they are `state["skills"]`,
    set again whenever one is learned (a checkpoint rewrites the key only then), and
    taken back by load_state_dict on resume with the `guesses` log.
    """

    entry_types = (Guess,)  # used in its logs (and memory): loaded back as Guess

    def __init__(self, config: Mapping[str, Any], memory: MemoryLog) -> None:
        self.config = dict(config)
        self.memory = memory
        self.state = AgentState(skills={})
        self.guesses = MemoryLog(entry_types=[Guess], memory_type="guesses")
        self._question = ""
        self._feedback: FeedbackContent | None = None

    def logs(self) -> Mapping[str, MemoryLog]:
        return {"guesses": self.guesses}

    def state_dict(self) -> AgentState:
        return self.state

    def load_state_dict(self, state: AgentState, logs: Mapping[str, MemoryLog]) -> None:
        self.state, self.guesses = state, logs["guesses"]

    async def act(self, observation: str) -> str:
        self._question = observation
        skill = self.state["skills"].get(observation)
        answer = skill if skill is not None else str(self.config.get("default", "0"))
        self.guesses.append(Guess(question=observation, answer=answer,
                                  from_skill=skill is not None))
        return answer

    async def observe(self, feedback: FeedbackContent) -> None:
        self._feedback = feedback

    async def reflect(self) -> str | None:
        fb, self._feedback = self._feedback, None
        if fb is None or fb.score >= 1.0 or "answer is " not in fb.message:
            return None
        answer = fb.message.rsplit("answer is ", 1)[1].rstrip(".")
        # A new dict, set again: a value is captured when its key is set.
        self.state["skills"] = {**self.state["skills"], self._question: answer}
        return None
