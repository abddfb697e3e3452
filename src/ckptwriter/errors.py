"""The one exception hierarchy of ckptwriter.

Every error the library raises on purpose derives from :class:`CheckpointError`, so
``except CheckpointError`` is enough for a caller that wants to report and stop::

    CheckpointError
    ├── ConfigError                  a configuration file or value is unusable
    ├── CheckpointNotFoundError      a path names no checkpoint ("Checkpoint not found")
    ├── CheckpointCorruptError       a checkpoint exists but a file is missing or damaged
    │   └── UnsafePathError          a manifest or pointer tries to leave its directory
    ├── MemoryTypeMismatchError      the checkpoint's memory type differs from the agent's
    ├── StorageError                 the disk or store refused an operation (ENOSPC, EACCES...)
    ├── DirectoryLockedError         another live writer owns the checkpoints directory
    ├── WriterClosedError            submit/flush on a writer that is closed or not started
    └── WriterFailedError            a background write failed; raised on the next call

Messages say what was expected, what was found and what to do.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DirectoryLockedError",
    "MemoryTypeMismatchError",
    "StorageError",
    "UnsafePathError",
    "WriterClosedError",
    "WriterFailedError",
]


class CheckpointError(Exception):
    """Root of every error ckptwriter raises on purpose."""


class ConfigError(CheckpointError):
    """A configuration file or value cannot be used."""


class CheckpointNotFoundError(CheckpointError):
    """A path does not name a checkpoint."""

    def __init__(self, path: str | Path, nearby: list[str] | None = None, hint: str = "") -> None:
        self.path = str(path)
        self.nearby = list(nearby or [])
        lines = [f"Checkpoint not found: {self.path}"]
        if hint:
            lines.append(hint)
        if self.nearby:
            lines.append("Checkpoints that do exist nearby:")
            lines.extend(f"  {p}" for p in self.nearby)
        else:
            lines.append("No checkpoints exist nearby; check the path with `ckptwriter ls`.")
        super().__init__("\n".join(lines))


class CheckpointCorruptError(CheckpointError):
    """A checkpoint directory exists but one of its files is missing or damaged."""

    def __init__(self, checkpoint: str | Path, file: str, problem: str) -> None:
        self.checkpoint = str(checkpoint)
        self.file = file
        self.problem = problem
        super().__init__(
            f"Checkpoint {self.checkpoint} is broken: {file}: {problem}. "
            "Resume from another checkpoint (`ckptwriter verify DIR` checks them all) "
            "or from `latest`, which falls back to the newest valid one."
        )


class UnsafePathError(CheckpointCorruptError):
    """A manifest or pointer names a path outside its checkpoint directory."""


class MemoryTypeMismatchError(CheckpointError):
    """The memory stored in a checkpoint is not the type the agent uses."""

    def __init__(self, checkpoint: str | Path, found: str, expected: str) -> None:
        self.found = found
        self.expected = expected
        super().__init__(
            f"Memory not restored: checkpoint {checkpoint} holds memory_type {found!r} "
            f"but the agent uses memory_type {expected!r}. "
            f"Set agent.memory_type: {found} or resume from a checkpoint of a {expected!r} agent."
        )


class StorageError(CheckpointError):
    """The filesystem or object store refused an operation."""


class DirectoryLockedError(CheckpointError):
    """Another live writer holds the lock on a checkpoints directory."""


class WriterClosedError(CheckpointError):
    """The writer is not running: not entered yet, or already closed."""


class WriterFailedError(CheckpointError):
    """A background checkpoint write failed; the cause is chained as ``__cause__``."""
