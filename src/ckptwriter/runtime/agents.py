"""Agents: the protocol the runtime drives, the built-in ``HistoryAgent``, and the loader.

An agent is any class built as ``AgentClass(config, memory)`` that implements
:class:`Agent`. The runtime, not the agent, appends every Observation, Action, Feedback
and Reflection to ``agent.memory`` (so the log always has the shape a checkpoint
expects); the agent reads its memory to decide. ``agent.type`` in the YAML is a
built-in name (``HistoryAgent``) or ``package.module:ClassName``, e.g. an LLM agent.
What an agent keeps besides its memory goes through the state hook
(:class:`StatefulAgent`, checked by :mod:`.state_hook`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from ..agent_state import AgentState
from ..config import AgentConfig
from ..errors import ConfigError
from ..memory import FeedbackContent, MemoryLog, Reflection
from .environments import parse_task
from .state_hook import check_agent, hook_of

__all__ = ["BUILTIN_AGENTS", "Agent", "HistoryAgent", "StatefulAgent", "create_agent",
           "resolve_agent_class"]


@runtime_checkable
class Agent(Protocol):
    """What the training runtime needs from an agent.

    Construction: ``AgentClass(config: Mapping[str, Any], memory: MemoryLog)``, where
    ``config`` is ``agent.config`` from the YAML and ``memory`` is a fresh log, or the
    restored one when the run resumes from a checkpoint.

    One step of an episode, in this order::

        memory.append(Observation(observation))
        action = await agent.act(observation)          # -> str
        memory.append(Action(action))
        memory.append(Feedback(feedback))
        await agent.observe(feedback)                  # FeedbackContent(score, message)
        reflection = await agent.reflect()             # -> str | None
        if reflection: memory.append(Reflection(reflection))

    Validation calls only ``act``; it must not change what the agent will do in
    training (a resumed run then matches an uninterrupted one whatever the
    validation schedule). ``config`` must be JSON-able: it is stored in ``agent.json``.

    An agent may append entries of its own types to its memory too (declared in
    ``entry_types``, below). Anything else it learns or keeps (counters, skills, an RNG,
    extra logs) is lost on resume unless it goes through the state hook, every part of
    it optional (see :class:`StatefulAgent`):

    - ``entry_types: tuple[type, ...]`` (class attribute): its own entry types (frozen
      pydantic models, msgspec Structs, dataclasses) in its memory and its logs. The
      runtime builds the memory with them and loads the checkpoint with them on resume.
    - ``state_types: tuple[type, ...]`` (class attribute): model classes it keeps as
      state values, loaded back as those classes on resume (a model value of another
      class is a ConfigError at start-up, a CheckpointError at a later checkpoint).
    - ``logs(self) -> Mapping[str, MemoryLog]``: extra named logs, each checkpointed
      incrementally as ``log.<name>.jsonl`` (names: letters, digits, ``_``, ``-``).
    - ``state_dict(self) -> AgentState``: an :class:`~ckptwriter.AgentState` the agent
      keeps, setting a key whenever its value changes (encoded then, once; a checkpoint
      captures it in O(number of keys) and writes only the keys set since the previous
      one). Values are captured when set: set the key again after changing a value in
      place. A plain ``Mapping`` works too, but is encoded again at every checkpoint.
    - ``load_state_dict(self, state: AgentState, logs: Mapping[str, MemoryLog])``:
      called on resume after construction, before the first episode, with the
      checkpoint's state (keep it and go on setting keys) and logs (adopt them: the
      runtime checkpoints what ``logs()`` returns from then on). Required when
      ``state_dict`` or ``logs`` is defined.

    The hook is checked at start-up, before any episode: ``logs()`` and ``state_dict()``
    are called once and what they return is checked; a wrong shape, an async method or
    a wrong signature is a ConfigError naming the problem. The runtime calls them at
    every checkpoint (and at the end of each episode, so that a checkpoint written
    because the agent raised holds the state of the last completed episode).
    """

    memory: MemoryLog
    config: Mapping[str, Any]

    async def act(self, observation: str) -> str:
        """The agent's answer to an observation."""
        ...

    async def observe(self, feedback: FeedbackContent) -> None:
        """The environment's verdict on the last action."""
        ...

    async def reflect(self) -> str | None:
        """A lesson to append to memory after the step, or None."""
        ...


@runtime_checkable
class StatefulAgent(Agent, Protocol):
    """An :class:`Agent` with the whole state hook (see :class:`Agent` for each part)."""

    def logs(self) -> Mapping[str, MemoryLog]:
        """Extra named logs to checkpoint besides the memory."""
        ...

    def state_dict(self) -> AgentState:
        """The agent's state besides its memory and logs."""
        ...

    def load_state_dict(self, state: AgentState, logs: Mapping[str, MemoryLog]) -> None:
        """Take back the state and logs of the checkpoint the run resumes from."""
        ...


class _HistoryAgentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    learn: bool = True
    known_ops: tuple[str, ...] = ("+",)


_LESSON_RE = re.compile(r"^Remember: (.+) -> (\S+) ")
_READ_SLICE = 4096


class HistoryAgent:
    """Answers arithmetic tasks and learns the ones it got wrong from its memory.

    It can add (``known_ops``) and mistakes every other operator for ``+``. After a
    wrong answer it reflects ``"Remember: Solve: 3*4=? -> 12 (...)"``; before acting it
    reads the Reflections appended to its memory since it last looked, so a task it
    got wrong once is answered correctly from then on, also after a resume.

    It goes through the state hook like any agent, but everything it learns is in its
    memory (the Reflections), so its state stays empty and its checkpoints hold exactly
    the guide's three files; resumed, it reads its restored memory once, on its first
    act. An agent that learns beyond its memory sets keys of its ``state_dict()``.

    Args:
        config: ``learn`` (default true; false gives the no-memory baseline) and
            ``known_ops`` (default ``["+"]``).
        memory: the agent's memory log.

    Raises:
        ConfigError: ``config`` has an unknown key or a wrong type.
    """

    def __init__(self, config: Mapping[str, Any], memory: MemoryLog) -> None:
        try:
            self._opts = _HistoryAgentConfig.model_validate(
                {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(
                f"agent.config.{where}: {err['msg']}; HistoryAgent accepts learn (bool) "
                "and known_ops (list of '+', '-', '*')"
            ) from None
        self.config: Mapping[str, Any] = dict(config)
        self.memory = memory
        self._cursor = 0
        self._lessons: dict[str, str] = {}
        self._state = AgentState()
        self._question: str | None = None
        self._answer: str | None = None
        self._feedback: FeedbackContent | None = None

    def _read_memory(self) -> None:
        # Incremental: each entry is looked at once, so acting stays O(1) amortized
        # however long the memory grows; a restored memory is read once, on first act.
        # In slices: a restored memory of millions of entries is never held as objects
        # all at once (a loaded log builds its entries when they are read).
        end = len(self.memory)
        while self._cursor < end:
            entries = self.memory[self._cursor : min(end, self._cursor + _READ_SLICE)]
            self._cursor += len(entries)
            for e in entries:
                if isinstance(e, Reflection):
                    m = _LESSON_RE.match(e.content)
                    if m:
                        self._lessons[m.group(1)] = m.group(2)

    def state_dict(self) -> AgentState:
        """Empty: what it learns is in its memory (a checkpoint writes no state file)."""
        return self._state

    def load_state_dict(self, state: AgentState, logs: Mapping[str, MemoryLog]) -> None:
        """Nothing to take back: the restored memory is read again on the first act.

        A state from another agent's checkpoint is ignored, not adopted: it would be
        written into every later checkpoint of this agent.
        """

    async def act(self, observation: str) -> str:
        """Answer from a lesson in memory, else compute (wrongly for unknown operators)."""
        if self._opts.learn:
            self._read_memory()
            known = self._lessons.get(observation)
            if known is not None:
                self._question, self._answer = observation, known
                return known
        parsed = parse_task(observation)
        if parsed is None:
            answer = "I don't know"
        else:
            a, op, b = parsed
            answer = str(a + b if op not in self._opts.known_ops or op == "+"
                         else a - b if op == "-" else a * b)
        self._question, self._answer = observation, answer
        return answer

    async def observe(self, feedback: FeedbackContent) -> None:
        """Keep the verdict for :meth:`reflect`."""
        self._feedback = feedback

    async def reflect(self) -> str | None:
        """After a wrong answer, write down the right one (taken from the feedback)."""
        fb, self._feedback = self._feedback, None
        if fb is None or fb.score >= 1.0 or self._question is None:
            return None
        m = re.search(r"answer is (\S+?)\.?$", fb.message)
        if m is None:
            return None
        return f"Remember: {self._question} -> {m.group(1)} (I answered {self._answer})"


BUILTIN_AGENTS: dict[str, type[Any]] = {"HistoryAgent": HistoryAgent}


def resolve_agent_class(type_name: str, search_dirs: tuple[str, ...] = ()) -> type[Any]:
    """The class ``agent.type`` names: a built-in name or ``module:Class``.

    Args:
        type_name: ``HistoryAgent`` or ``package.module:ClassName``.
        search_dirs: directories tried for the module when it is not importable
            as installed (the working directory, the config file's directory).

    Raises:
        ConfigError: unknown name, module not importable, or not an agent class.
    """
    if type_name in BUILTIN_AGENTS:
        return BUILTIN_AGENTS[type_name]
    module_name, sep, attr = type_name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"agent.type {type_name!r} is not a built-in agent "
            f"({', '.join(BUILTIN_AGENTS)}) nor a 'package.module:ClassName' import path"
        )
    try:
        module = _import(module_name, search_dirs)
    except ImportError as exc:
        raise ConfigError(
            f"agent.type {type_name!r}: module {module_name!r} cannot be imported ({exc}); "
            "install it or run from the directory that holds it"
        ) from None
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"agent.type {type_name!r}: {module_name} has no class {attr!r}")
    missing = [m for m in ("act", "observe", "reflect")
               if not inspect.iscoroutinefunction(getattr(cls, m, None))]
    if missing:
        raise ConfigError(
            f"agent.type {type_name!r} does not implement the agent protocol: "
            f"{', '.join(missing)} must be async methods (see ckptwriter.runtime.Agent)"
        )
    return cls


def _import(module_name: str, search_dirs: tuple[str, ...]) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        extra = [d for d in search_dirs if d not in sys.path]
        if not extra:
            raise
    # Like `python -m`, let a user's module next to the config (or in the working
    # directory) be found when the console script runs from elsewhere.
    sys.path[:0] = extra
    try:
        return importlib.import_module(module_name)
    finally:
        for d in extra:
            if d in sys.path:
                sys.path.remove(d)


def create_agent(
    config: AgentConfig, memory: MemoryLog, search_dirs: tuple[str, ...] | None = None
) -> Agent:
    """Build the configured agent around ``memory``, its state hook checked.

    Raises:
        ConfigError: the agent cannot be built from the configuration, or its state
            hook has the wrong shape (:mod:`.state_hook`).
    """
    dirs = (os.getcwd(),) if search_dirs is None else search_dirs
    cls = resolve_agent_class(config.type, dirs)
    hook = hook_of(cls, config.type)
    try:
        agent = cls(dict(config.config), memory)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"agent.type {config.type!r} could not be created with agent.config "
            f"{dict(config.config)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if getattr(agent, "memory", None) is not memory:
        raise ConfigError(
            f"agent.type {config.type!r} must keep the memory it is given as `.memory` "
            "(the runtime appends to it and checkpoints it)"
        )
    check_agent(agent, hook)
    return agent  # type: ignore[no-any-return]
