"""Re-exports of :mod:`ckptwriter.reader` for code not yet switched to it.

# removed at the cut-over
"""

from __future__ import annotations

from .reader import CheckpointFallbackWarning as CheckpointFallbackWarning
from .reader import CheckpointInfo as CheckpointInfo
from .reader import LoadedCheckpoint as LoadedCheckpoint
from .reader import list_checkpoints as list_checkpoints
from .reader import load_checkpoint as load_checkpoint
from .reader import resolve_checkpoint as resolve_checkpoint
from .reader import verify_checkpoint as verify_checkpoint

__all__ = [
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "scan_checkpoints",
    "verify_checkpoint",
]

# The writer's old start-up listing took a location; reader.scan takes a store.
scan_checkpoints = list_checkpoints
