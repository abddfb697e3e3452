"""The state hook of agents: what an agent keeps besides its memory, saved and restored.

In the spirit of PyTorch's ``state_dict()`` / ``load_state_dict()``; every part is
optional (an agent without any of them works as before)::

    class MyAgent:
        entry_types = (ChatMessage,)    # its own entry types, in its memory and its logs
        state_types = (SkillBook,)      # model classes it keeps as state values

        def logs(self) -> Mapping[str, MemoryLog]: ...       # extra named logs
        def state_dict(self) -> AgentState: ...              # kept, set when it changes
        def load_state_dict(self, state: AgentState,
                            logs: Mapping[str, MemoryLog]) -> None: ...  # on resume

Data flow: :func:`hook_of` checks the class (before the checkpoint is loaded, whose
loader needs ``entry_types`` and ``state_types``) -> the agent is built ->
:func:`check_agent` calls ``logs()`` and ``state_dict()`` once and checks what they
return -> on resume :func:`restore` hands the checkpoint's state and logs to
``load_state_dict`` -> every checkpoint takes :func:`agent_logs` and :func:`agent_state`.
Everything wrong with the hook is a :class:`~ckptwriter.ConfigError` before any episode.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..agent_state import AgentState, StateItem, check_name
from ..errors import CheckpointError, ConfigError, UnknownEntryTypeError, UnknownStateTypeError
from ..memory import MemoryLog
from ..reader import LoadedCheckpoint

__all__ = ["AgentHook", "EpisodeMark", "agent_logs", "agent_state", "check_agent", "episode_mark",
           "hook_of", "memory_up_to", "restore", "snapshot_parts", "types_refusal"]

_FIX = "see ckptwriter.runtime.Agent"


@dataclass(frozen=True)
class AgentHook:
    """Which parts of the state hook an agent class has, checked."""

    type_name: str
    entry_types: tuple[type, ...] = ()
    state_types: tuple[type, ...] = ()
    logs: bool = False
    state: bool = False
    load: bool = False

    @property
    def stateful(self) -> bool:
        """The agent keeps something besides its memory (logs or state)."""
        return self.logs or self.state


def _types(cls: type, attr: str, type_name: str) -> tuple[type, ...]:
    value = getattr(cls, attr, ())
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not all(inspect.isclass(t) for t in value):
        raise ConfigError(
            f"agent.type {type_name!r}: {cls.__name__}.{attr} must be a tuple of classes, "
            f"got {value!r} ({_FIX})"
        )
    return value


def _method(cls: type, name: str, type_name: str, params: int) -> bool:
    """Whether ``cls`` defines hook method ``name`` taking ``params`` arguments."""
    fn = inspect.getattr_static(cls, name, None)
    if fn is None:
        return False
    where = f"agent.type {type_name!r}: {cls.__name__}.{name}"
    if isinstance(fn, (staticmethod, classmethod)) or not inspect.isfunction(fn):
        raise ConfigError(f"{where} must be a plain method (def {name}(self...)), "
                          f"not {type(fn).__name__} ({_FIX})")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigError(f"{where} must be a plain method, not async: the runtime calls "
                          f"it between episodes ({_FIX})")
    try:
        inspect.signature(fn).bind(*([None] * (params + 1)))
    except TypeError:
        args = "self, state, logs" if params == 2 else "self"
        raise ConfigError(f"{where} must take ({args}), got {inspect.signature(fn)} "
                          f"({_FIX})") from None
    return True


def hook_of(cls: type, type_name: str) -> AgentHook:
    """The state hook of agent class ``cls``, checked as far as the class shows it.

    Raises:
        ConfigError: an attribute or method of the hook has the wrong shape, an entry
            type cannot be stored, or state (or logs) would be saved but never restored.
    """
    entry_types = _types(cls, "entry_types", type_name)
    state_types = _types(cls, "state_types", type_name)
    for attr, types in (("entry_types", entry_types), ("state_types", state_types)):
        try:
            MemoryLog(entry_types=types)  # state model classes take the same checks
        except TypeError as exc:
            raise ConfigError(f"agent.type {type_name!r}: {cls.__name__}.{attr}: {exc}"
                              ) from None
    hook = AgentHook(type_name, entry_types, state_types,
                     logs=_method(cls, "logs", type_name, 0),
                     state=_method(cls, "state_dict", type_name, 0),
                     load=_method(cls, "load_state_dict", type_name, 2))
    if hook.stateful and not hook.load:
        what = "state_dict" if hook.state else "logs"
        raise ConfigError(
            f"agent.type {type_name!r}: {cls.__name__} defines {what}() but not "
            "load_state_dict(self, state, logs): what it saves would never be given back "
            f"on resume, and a resumed run would not continue as it left off ({_FIX})"
        )
    return hook


def _logs_of(agent: Any, hook: AgentHook) -> dict[str, MemoryLog]:
    """``agent.logs()`` checked; ValueError says what is wrong with it."""
    if not hook.logs:
        return {}
    logs = agent.logs()
    if not isinstance(logs, Mapping):
        raise ValueError(f"logs() returned {type(logs).__name__}, expected a Mapping of "
                         "names to MemoryLog")
    seen: dict[int, str] = {id(agent.memory): "the agent's memory"}
    known = set(hook.entry_types)
    out: dict[str, MemoryLog] = {}
    for name, log in logs.items():
        if name == "memory":
            raise ValueError("logs() has a log named 'memory': that name is the agent's "
                             "memory itself; give the log another name")
        check_name(name, "logs() has a log named")
        if not isinstance(log, MemoryLog):
            raise ValueError(f"logs()[{name!r}] is a {type(log).__name__}, expected a "
                             "ckptwriter.MemoryLog")
        if id(log) in seen:
            raise ValueError(f"logs()[{name!r}] is {seen[id(log)]} again: give each log "
                             "its own MemoryLog")
        seen[id(log)] = f"logs()[{name!r}]"
        unknown = [t.__name__ for t in log.entry_types if t not in known]
        if unknown:
            raise ValueError(
                f"logs()[{name!r}] holds entry type(s) {', '.join(unknown)} that are not "
                f"in {type(agent).__name__}.entry_types: add them there, the checkpoint "
                "is loaded back with those types on resume"
            )
        out[name] = log
    return out


def _state_of(agent: Any, hook: AgentHook) -> AgentState | None:
    """``agent.state_dict()`` as an AgentState; ValueError/TypeError say what is wrong."""
    if not hook.state:
        return None
    state = agent.state_dict()
    if isinstance(state, AgentState):
        return _typed(agent, hook, state)
    if not isinstance(state, Mapping):
        raise ValueError(f"state_dict() returned {type(state).__name__}, expected a "
                         "ckptwriter.AgentState (or a Mapping of names to values)")
    # A plain mapping is encoded again at every checkpoint: an AgentState is not.
    try:
        state = AgentState(state)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"state_dict() returned a mapping a checkpoint cannot hold: {exc}"
                        ) from None
    return _typed(agent, hook, state)


def _typed(agent: Any, hook: AgentHook, state: AgentState) -> AgentState:
    """``state``, if the class of each model value in it is in the hook's state_types.

    A resumed run loads the state with those classes: a class not there would be saved
    at every checkpoint and then stop the resume (as ``logs()`` entry types do).
    """
    known = set(hook.state_types)
    lacking: dict[str, str] = {}
    for key, item in state.capture().items():
        if item.value.kind == "model" and (cls := type(state[key])) not in known:
            lacking.setdefault(cls.__name__, key)
    if lacking:
        name = type(agent).__name__
        held = ", ".join(f"state_dict()[{k!r}] holds a {c}" for c, k in lacking.items())
        what = "a model class" if len(lacking) == 1 else "model classes"
        them = "it" if len(lacking) == 1 else "them"
        names = [*(t.__name__ for t in hook.state_types), *lacking]
        raise ValueError(
            f"{held}, {what} not in {name}.state_types: add {them} to the agent class "
            f"(state_types = {_tuple(names)}); a resumed run loads the checkpoint's state "
            "with those classes")
    return state


def _tuple(names: list[str]) -> str:
    return f"({names[0]},)" if len(names) == 1 else f"({', '.join(names)})"


def check_agent(agent: Any, hook: AgentHook) -> None:
    """Call the agent's ``logs()`` and ``state_dict()`` once and check what they return.

    Raises:
        ConfigError: the hook returns something a checkpoint cannot hold.
    """
    if hook.logs and not callable(getattr(agent, "logs", None)):
        raise ConfigError(f"agent.type {hook.type_name!r}: the agent's `logs` attribute "
                          f"hides its logs() method ({_FIX})")
    lacking = [t.__name__ for t in hook.entry_types if t not in agent.memory.entry_types]
    if lacking:
        raise ConfigError(f"agent.type {hook.type_name!r}: the agent's memory does not take "
                          f"its entry_types {', '.join(lacking)}: build the memory with "
                          "MemoryLog(entry_types=AgentClass.entry_types)")
    try:
        _logs_of(agent, hook)
        _state_of(agent, hook)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"agent.type {hook.type_name!r}: {type(agent).__name__}.{exc} "
                          f"({_FIX})") from None


def types_refusal(exc: UnknownEntryTypeError, hook: AgentHook) -> ConfigError:
    """What a checkpoint holding a class the agent's hook lacks means for a runtime user:
    the agent class's ``entry_types`` or ``state_types`` (not ``load_checkpoint``)."""
    name = hook.type_name.rpartition(":")[2]
    if isinstance(exc, UnknownStateTypeError):
        attr, have, names = "state_types", hook.state_types, [exc.cls.rpartition(":")[2]]
        held = f"checkpoint {exc.source} holds state[{exc.key!r}], a {exc.cls} (tag {exc.found!r})"
    else:
        attr, have, names = "entry_types", hook.entry_types, list(exc.tags)
        held = f"{exc.source} holds entries of type {', '.join(map(repr, exc.tags))}"
    tags = "that tag: add the class" if len(names) == 1 else "those tags: add the classes"
    return ConfigError(
        f"agent.type {hook.type_name!r}: {held}, and no class in {name}.{attr} has "
        f"{tags} to the agent class ({attr} = "
        f"{_tuple([*(t.__name__ for t in have), *names])}); a resumed run loads the "
        f"checkpoint with those classes ({_FIX})")


def restore(agent: Any, hook: AgentHook, loaded: LoadedCheckpoint) -> None:
    """Give the checkpoint's state and logs to ``agent.load_state_dict``, then re-check.

    Raises:
        ConfigError: ``load_state_dict`` raised, or the hook is unusable afterwards.
    """
    if not hook.load:
        return
    try:
        agent.load_state_dict(loaded.state, loaded.logs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"agent.type {hook.type_name!r}: {type(agent).__name__}.load_state_dict could "
            f"not restore the state of checkpoint {loaded.path}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    check_agent(agent, hook)


def agent_logs(agent: Any, hook: AgentHook) -> dict[str, MemoryLog]:
    """The agent's logs for a checkpoint (its hook was checked at start).

    Raises:
        CheckpointError: ``logs()`` now returns something a checkpoint cannot hold.
    """
    try:
        return _logs_of(agent, hook)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{type(agent).__name__}.{exc}") from None


def agent_state(agent: Any, hook: AgentHook) -> AgentState | None:
    """The agent's state for a checkpoint, None without ``state_dict``.

    Raises:
        CheckpointError: ``state_dict()`` now returns something a checkpoint cannot hold.
    """
    try:
        return _state_of(agent, hook)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{type(agent).__name__}.{exc}") from None


@dataclass(frozen=True)
class EpisodeMark:
    """The agent's logs and state as they were at the end of an episode.

    ``known`` is False for a ``state_dict`` returning a plain mapping: encoding it at the
    end of every episode would cost what a checkpoint costs, so its state there is not
    kept, and no checkpoint of that episode can be written later.
    """

    lengths: dict[str, int]
    state: Mapping[str, StateItem] | None
    known: bool = True


class _Frozen(AgentState):
    """An AgentState as captured at a mark: a checkpoint takes these versions and bytes."""

    def __init__(self, items: Mapping[str, StateItem]) -> None:
        super().__init__()
        self._items = dict(items)

    def capture(self) -> dict[str, StateItem]:
        return dict(self._items)


def episode_mark(agent: Any, hook: AgentHook) -> EpisodeMark | None:
    """The end of an episode, for a checkpoint written later: O(logs + keys), no encoding.

    None for an agent without logs or state (its memory length is mark enough).
    """
    if not hook.stateful:
        return None
    lengths = {n: len(lg) for n, lg in agent_logs(agent, hook).items()}
    if not hook.state:
        return EpisodeMark(lengths, None)
    state = agent.state_dict()
    if not isinstance(state, AgentState):
        return EpisodeMark(lengths, None, known=False)
    return EpisodeMark(lengths, state.capture())


def snapshot_parts(agent: Any, hook: AgentHook, mark: EpisodeMark | None = None
                   ) -> dict[str, Any]:
    """``logs=`` and ``state=`` of a Snapshot: now, or as they were at ``mark``.

    Raises:
        CheckpointError: ``logs()`` or ``state_dict()`` returns something unusable.
    """
    if not hook.stateful:
        return {}
    if mark is not None and not mark.known:
        raise CheckpointError(
            f"{type(agent).__name__}.state_dict() returns a plain mapping, whose state at "
            "the end of that episode was not kept: no checkpoint of it is written "
            "(return an AgentState to have one)")
    logs = agent_logs(agent, hook)
    state = agent_state(agent, hook)
    if mark is not None:
        # A log appended to after the mark is cut back; one made after it is left out.
        logs = {n: memory_up_to(lg, mark.lengths[n]) for n, lg in logs.items()
                if n in mark.lengths}
        state = None if mark.state is None else _Frozen(mark.state)
    return {"logs": logs, "state": state}


def memory_up_to(memory: MemoryLog, length: int) -> MemoryLog:
    """``memory`` as it was with ``length`` entries (itself if it still is): O(length)."""
    if len(memory) == length:
        return memory
    out = MemoryLog(memory_type=memory.memory_type, entry_types=memory.entry_types)
    out.extend(memory[:length])
    return out
