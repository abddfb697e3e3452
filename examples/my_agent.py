"""A custom agent for `agent.type: my_agent:NotebookAgent` (see custom_agent.yaml).

It implements ckptwriter.runtime.Agent: built as NotebookAgent(config, memory), with
async act/observe/reflect. The runtime appends Observation/Action/Feedback/Reflection
to `self.memory`; the agent only reads it. An LLM agent has the same shape: build the
prompt from `self.memory` in act(), return the model's answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptwriter import FeedbackContent, MemoryLog, Reflection


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
