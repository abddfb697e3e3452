"""From a configuration to a run plan: resume from a checkpoint, or start fresh.

Steps 1-2 and 4 of the guide's "What happens": under ``resume_from`` the checkpoint is
loaded and verified, its memory type checked and its memory restored, and the task
sequence is advanced past episodes 1..N. Everything here runs before any episode, so a
configuration that cannot run fails before it writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..errors import ConfigError
from ..memory import MemoryLog
from ..reader import LoadedCheckpoint, load_checkpoint
from .agents import Agent, create_agent
from .environments import ArithmeticEnvironment, Task, TaskSequence, load_validation_dataset

__all__ = ["RunPlan", "prepare_run"]


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


def prepare_run(cfg: Config, search_dirs: tuple[str, ...] | None) -> RunPlan:
    """Everything that can fail because of the configuration, before any episode.

    Args:
        cfg: the run's configuration.
        search_dirs: where a ``module:Class`` agent may be found besides ``sys.path``.

    Returns:
        the plan; under ``resume_from`` the checkpoint is loaded and verified, the
        memory restored and the task sequence advanced past its episodes.

    Raises:
        ConfigError: nothing is left to train, or the agent or validation data is
            unusable.
        CheckpointNotFoundError, CheckpointCorruptError, MemoryTypeMismatchError:
            ``resume_from`` cannot be used.
    """
    rt = cfg.runtime
    resumed: LoadedCheckpoint | None = None
    first, steps = 0, 0
    if rt.resume_from is not None:
        # Steps 1-2 of the guide's "What happens": manifest loaded (and verified against
        # its checksums), memory restored, with the memory type checked against ours.
        resumed = load_checkpoint(rt.resume_from, expected_memory_type=cfg.agent.memory_type)
        memory = resumed.memory
        first, steps = resumed.runtime.episode_index, resumed.runtime.train_steps_total
    else:
        memory = MemoryLog(memory_type=cfg.agent.memory_type)
    target = rt.episodes_for(first)
    if target <= first:
        raise ConfigError(
            f"{cfg.source}: the checkpoint {rt.resume_from} is at episode {first} and "
            f"runtime.max_envs_to_visit is {target}: nothing left to train. "
            f"Set max_envs_to_visit above {first} to continue"
        )
    agent = create_agent(cfg.agent, memory, search_dirs)
    env = ArithmeticEnvironment(cfg.environment)
    sequence = env.sequence()
    # Step 4: episodes 1..N are skipped by advancing the task sequence, so the resumed
    # run visits exactly the tasks an uninterrupted run would from N+1 on.
    sequence.skip(first)
    validating = rt.validation_freq is not None or rt.run_validation_at_start
    validation = load_validation_dataset(cfg.validation, env) if validating else []
    return RunPlan(cfg, agent, memory, sequence, validation, first, target, steps, resumed)
