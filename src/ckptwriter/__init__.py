"""ckptwriter: an asynchronous, crash-safe checkpoint writer for long training runs.

The training loop submits :class:`Snapshot` objects to a :class:`CheckpointWriter`;
a background writer commits them atomically, moves ``latest`` and applies retention.
"""

from __future__ import annotations

from .agent_state import AgentState as AgentState
from .errors import CheckpointCorruptError as CheckpointCorruptError
from .errors import CheckpointError as CheckpointError
from .errors import CheckpointExistsError as CheckpointExistsError
from .errors import CheckpointNotFoundError as CheckpointNotFoundError
from .errors import ClassMismatchError as ClassMismatchError
from .errors import ConfigError as ConfigError
from .errors import DirectoryLockedError as DirectoryLockedError
from .errors import MemoryTypeMismatchError as MemoryTypeMismatchError
from .errors import StorageError as StorageError
from .errors import UnknownEntryTypeError as UnknownEntryTypeError
from .errors import UnknownStateTypeError as UnknownStateTypeError
from .errors import UnsafePathError as UnsafePathError
from .errors import WriterClosedError as WriterClosedError
from .errors import WriterFailedError as WriterFailedError
from .gil import switch_interval as switch_interval
from .handles import CheckpointHandle as CheckpointHandle
from .handles import CheckpointResult as CheckpointResult
from .memory import Action as Action
from .memory import Feedback as Feedback
from .memory import FeedbackContent as FeedbackContent
from .memory import MemoryEntry as MemoryEntry
from .memory import MemoryLog as MemoryLog
from .memory import Observation as Observation
from .memory import Reflection as Reflection
from .reader import CheckpointFallbackWarning as CheckpointFallbackWarning
from .reader import CheckpointInfo as CheckpointInfo
from .reader import LoadedCheckpoint as LoadedCheckpoint
from .reader import list_checkpoints as list_checkpoints
from .reader import load_checkpoint as load_checkpoint
from .reader import resolve_checkpoint as resolve_checkpoint
from .reader import verify_checkpoint as verify_checkpoint
from .snapshot import Snapshot as Snapshot
from .stats import WriterStats as WriterStats
from .sync import SyncCheckpointHandle as SyncCheckpointHandle
from .sync import SyncCheckpointWriter as SyncCheckpointWriter
from .writer import CheckpointWriter as CheckpointWriter

__version__ = "0.1.0"

__all__ = [
    "Action",
    "AgentState",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFallbackWarning",
    "CheckpointHandle",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointResult",
    "CheckpointWriter",
    "ClassMismatchError",
    "ConfigError",
    "DirectoryLockedError",
    "Feedback",
    "FeedbackContent",
    "LoadedCheckpoint",
    "MemoryEntry",
    "MemoryLog",
    "MemoryTypeMismatchError",
    "Observation",
    "Reflection",
    "Snapshot",
    "StorageError",
    "SyncCheckpointHandle",
    "SyncCheckpointWriter",
    "UnknownEntryTypeError",
    "UnknownStateTypeError",
    "UnsafePathError",
    "WriterClosedError",
    "WriterFailedError",
    "WriterStats",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "switch_interval",
    "verify_checkpoint",
]
