"""The built-in environments: deterministic arithmetic tasks, and the validation dataset.

An episode visits one task (``"Solve: 7*8=?"``); the feedback is ``{score, message}``
and a wrong answer's message tells the right one, so an agent that learns from its
memory gets the task right the next time it sees it. The sequence of tasks is a pure
function of the seed: :meth:`TaskSequence.skip` advances it without running episodes,
which is how a resumed run sees exactly the tasks an uninterrupted run would.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import BUILTIN_DATASET, EnvironmentConfig, ValidationConfig
from ..errors import ConfigError
from ..memory import FeedbackContent

__all__ = [
    "ArithmeticEnvironment",
    "Task",
    "TaskSequence",
    "load_validation_dataset",
    "parse_task",
]

_TASK_RE = re.compile(r"^Solve: (-?\d+)([+\-*])(-?\d+)=\?$")
_OPS = ("+", "-", "*")
# Validation tasks come from their own stream so they do not mirror the training order.
_VALIDATION_SALT = 7919


@dataclass(frozen=True, slots=True)
class Task:
    """One arithmetic question and its answer."""

    question: str
    answer: str

    def grade(self, action: str) -> FeedbackContent:
        """The environment's verdict on an answer."""
        if action.strip() == self.answer:
            return FeedbackContent(score=1.0, message="Correct!")
        return FeedbackContent(score=0.0, message=f"Incorrect. The answer is {self.answer}.")


def parse_task(question: str) -> tuple[int, str, int] | None:
    """``(a, op, b)`` of ``"Solve: a op b=?"``, or None for any other text."""
    m = _TASK_RE.match(question)
    if m is None:
        return None
    return int(m.group(1)), m.group(2), int(m.group(3))


def make_task(a: int, op: str, b: int) -> Task:
    """The task ``a op b``."""
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return Task(f"Solve: {a}{op}{b}=?", str(value))


class ArithmeticEnvironment:
    """A fixed pool of distinct arithmetic tasks, visited in a seeded random order.

    Args:
        config: the ``environment:`` section.
    """

    def __init__(self, config: EnvironmentConfig) -> None:
        self.config = config
        rng = random.Random(config.seed)
        span = config.max_operand + 1
        possible = span * span * len(_OPS)
        want = min(config.num_tasks, possible)
        seen: set[tuple[int, str, int]] = set()
        pool: list[Task] = []
        while len(pool) < want:
            key = (rng.randrange(span), rng.choice(_OPS), rng.randrange(span))
            if key not in seen:
                seen.add(key)
                pool.append(make_task(*key))
        self.tasks: tuple[Task, ...] = tuple(pool)

    def sequence(self) -> TaskSequence:
        """The training order: episode 1 gets the first task of the sequence."""
        return TaskSequence(self.tasks, self.config.seed)

    def validation_tasks(self, size: int) -> list[Task]:
        """The built-in validation dataset: ``size`` tasks of the pool (fixed order)."""
        rng = random.Random(self.config.seed * 1_000_003 + _VALIDATION_SALT)
        order = list(range(len(self.tasks)))
        rng.shuffle(order)
        return [self.tasks[i] for i in order[: min(size, len(order))]]


class TaskSequence(Iterator[Task]):
    """The seeded, endless sequence of tasks episodes visit."""

    def __init__(self, tasks: tuple[Task, ...], seed: int) -> None:
        self._tasks = tasks
        self._rng = random.Random(seed)
        self.position = 0

    def __next__(self) -> Task:
        self.position += 1
        return self._tasks[self._rng.randrange(len(self._tasks))]

    def skip(self, n: int) -> None:
        """Advance past ``n`` episodes without running them (resume)."""
        for _ in range(n):
            self._rng.randrange(len(self._tasks))
        self.position += n


def load_validation_dataset(config: ValidationConfig, env: ArithmeticEnvironment) -> list[Task]:
    """The tasks validation scores the agent on.

    ``built-in`` takes ``size`` tasks of the environment's pool; any other value is a
    JSON Lines file of ``{"question": "Solve: 2+2=?", "answer": "4"}`` objects.

    Raises:
        ConfigError: the file is missing, empty or has a malformed line (named).
    """
    name = config.validation_dataset
    if name is None:
        return []
    if name == BUILTIN_DATASET:
        return env.validation_tasks(config.size)
    path = Path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"validation.validation_dataset {name!r} cannot be read ({exc}); "
            f"use {BUILTIN_DATASET} or a JSON Lines file"
        ) from None
    tasks: list[Task] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            tasks.append(Task(str(obj["question"]), str(obj["answer"]).strip()))
        except RecursionError:
            # json.loads recurses once per nesting level: a hostile line of "[[[[..."
            # exhausts the stack before it is seen not to be a task.
            raise ConfigError(
                f"validation.validation_dataset {name}: line {no} is nested too deeply to be "
                '{"question": ..., "answer": ...}'
            ) from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"validation.validation_dataset {name}: line {no} is not "
                '{"question": ..., "answer": ...}'
            ) from None
    if not tasks:
        raise ConfigError(f"validation.validation_dataset {name} holds no tasks")
    return tasks
