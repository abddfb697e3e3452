"""From a configuration to a run plan: resume from a checkpoint, or start fresh.

Steps 1-2 and 4 of the guide's "What happens": under ``resume_from`` the checkpoint is
loaded and verified, its memory type checked and its memory restored, and the task
sequence is advanced past episodes 1..N. The agent's class is resolved first: its state
hook (:mod:`.state_hook`) names the entry and state types the checkpoint is loaded with,
and once built the agent takes back its state and logs (``load_state_dict``).
Everything here runs before any episode, so a configuration that cannot run fails
before it writes anything.

``resume_from: auto`` and ``best`` name checkpoints of this run name's runs
(:mod:`.resume`); an auto-resumed run continues in the run directory it resumed from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..config import DEFAULT_MAX_ENVS_TO_VISIT, RESUME_AUTO, Config
from ..errors import ConfigError, UnknownEntryTypeError
from ..memory import MemoryLog
from ..reader import LoadedCheckpoint
from .agents import Agent, create_agent, resolve_agent_class
from .environments import ArithmeticEnvironment, Task, TaskSequence, load_validation_dataset
from .resume import find_resume
from .state_hook import AgentHook, hook_of, restore, types_refusal

__all__ = ["RunPlan", "prepare_run"]

log = logging.getLogger("ckptwriter.runtime")
_T = TypeVar("_T")


@dataclass
class RunPlan:
    """What a run starts from: agent, memory, tasks and counters, resumed or fresh."""

    cfg: Config
    agent: Agent
    memory: MemoryLog
    sequence: TaskSequence
    validation: list[Task]
    first_episode: int
    target_episode: int
    train_steps: int
    resumed: LoadedCheckpoint | None
    # resume_from: auto: the run directory continued in place (its checkpoints directory
    # is the resumed checkpoint's); None: a new run directory.
    continue_in: Path | None = None
    # resume_from: auto found the run already at its last episode: nothing to do.
    complete: bool = False
    # The agent's state hook (its entry types, logs, state), checked.
    hook: AgentHook | None = None


def prepare_run(cfg: Config, search_dirs: tuple[str, ...] | None) -> RunPlan:
    """Everything that can fail because of the configuration, before any episode.

    Args:
        cfg: the run's configuration.
        search_dirs: where a ``module:Class`` agent may be found besides ``sys.path``.

    Returns:
        the plan; under ``resume_from`` the checkpoint is loaded and verified, the
        memory restored and the task sequence advanced past its episodes.

    Raises:
        ConfigError: nothing is left to train, the agent or validation data is
            unusable, or the checkpoint holds a class the agent's ``entry_types`` or
            ``state_types`` lack.
        CheckpointNotFoundError, CheckpointCorruptError, MemoryTypeMismatchError:
            ``resume_from`` cannot be used.
    """
    rt = cfg.runtime
    first, steps = 0, 0
    auto = rt.resume_from == RESUME_AUTO
    # The agent's own entry and state types are needed to load its checkpoint.
    hook = _named(cfg, lambda: hook_of(
        resolve_agent_class(cfg.agent.type, _dirs(search_dirs)), cfg.agent.type))
    # Steps 1-2 of the guide's "What happens": manifest loaded (and verified against its
    # checksums), memory restored, with the memory type checked against ours.
    resumed, continue_in = _named(cfg, lambda: _resume(cfg, hook))
    if resumed is not None:
        memory = resumed.memory
        first, steps = resumed.runtime.episode_index, resumed.runtime.train_steps_total
    else:
        memory = MemoryLog(memory_type=cfg.agent.memory_type, entry_types=hook.entry_types)
    # A requeued job runs the same command again: under auto the last episode is fixed
    # (not "100 more than the checkpoint"), so every attempt aims at the same end.
    target = (rt.max_envs_to_visit or DEFAULT_MAX_ENVS_TO_VISIT) if auto else rt.episodes_for(
        first)
    agent = create_agent_for(cfg, memory, search_dirs)
    if resumed is not None:
        # After construction, before the first episode: the agent takes back its state
        # and logs (state_dict / load_state_dict).
        _named(cfg, lambda: restore(agent, hook, resumed))
    if auto and resumed is not None and target <= first:
        log.info("Run %s is already complete at episode %d (%s); nothing to train",
                 cfg.name, first, resumed.path)
        return RunPlan(cfg, agent, memory, ArithmeticEnvironment(cfg.environment).sequence(),
                       [], first, first, steps, resumed, continue_in, complete=True,
                       hook=hook)
    if target <= first:
        raise ConfigError(
            f"{cfg.source}: the checkpoint {rt.resume_from} is at episode {first} and "
            f"runtime.max_envs_to_visit is {target}: nothing left to train. "
            f"Set max_envs_to_visit above {first} to continue"
        )
    env = ArithmeticEnvironment(cfg.environment)
    sequence = env.sequence()
    # Step 4: episodes 1..N are skipped by advancing the task sequence, so the resumed
    # run visits exactly the tasks an uninterrupted run would from N+1 on.
    sequence.skip(first)
    validating = rt.validation_freq is not None or rt.run_validation_at_start
    validation = load_validation_dataset(cfg.validation, env) if validating else []
    return RunPlan(cfg, agent, memory, sequence, validation, first, target, steps, resumed,
                   continue_in, hook=hook)


def _resume(cfg: Config, hook: AgentHook) -> tuple[LoadedCheckpoint | None, Path | None]:
    """:func:`find_resume` with the agent's types; a class they lack is a ConfigError."""
    try:
        return find_resume(cfg, entry_types=hook.entry_types, state_types=hook.state_types)
    except UnknownEntryTypeError as exc:
        raise types_refusal(exc, hook) from exc


def create_agent_for(cfg: Config, memory: MemoryLog, search_dirs: tuple[str, ...] | None
                     ) -> Agent:
    """The configured agent; a ConfigError names the config file, as every other one does."""
    return _named(cfg, lambda: create_agent(cfg.agent, memory, search_dirs))


def _dirs(search_dirs: tuple[str, ...] | None) -> tuple[str, ...]:
    return (os.getcwd(),) if search_dirs is None else search_dirs


def _named(cfg: Config, build: Callable[[], _T]) -> _T:
    """``build()``; a ConfigError it raises names the config file, as every other one does."""
    try:
        return build()
    except ConfigError as exc:
        if str(exc).startswith(f"{cfg.source}:"):
            raise
        raise ConfigError(f"{cfg.source}: {exc}") from exc.__cause__
