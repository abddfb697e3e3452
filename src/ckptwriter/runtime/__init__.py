"""The reference training runtime: agents, environments, the loop and its progress bar.

``ckptwriter train`` runs :func:`run_training` on a configuration from
:func:`ckptwriter.config.load_config`. Plug in an agent with ``agent.type:
package.module:ClassName``; it implements :class:`Agent`, and :class:`StatefulAgent`'s
state hook for what it keeps besides its memory.
"""

from __future__ import annotations

from .agents import Agent as Agent
from .agents import HistoryAgent as HistoryAgent
from .agents import StatefulAgent as StatefulAgent
from .agents import create_agent as create_agent
from .agents import resolve_agent_class as resolve_agent_class
from .environments import ArithmeticEnvironment as ArithmeticEnvironment
from .environments import Task as Task
from .environments import TaskSequence as TaskSequence
from .environments import load_validation_dataset as load_validation_dataset
from .loop import TrainResult as TrainResult
from .loop import run_training as run_training
from .progress import NullReporter as NullReporter
from .progress import Reporter as Reporter
from .progress import RichReporter as RichReporter
from .progress import TrainStatus as TrainStatus

__all__ = [
    "Agent",
    "ArithmeticEnvironment",
    "HistoryAgent",
    "NullReporter",
    "Reporter",
    "RichReporter",
    "StatefulAgent",
    "Task",
    "TaskSequence",
    "TrainResult",
    "TrainStatus",
    "create_agent",
    "load_validation_dataset",
    "resolve_agent_class",
    "run_training",
]
