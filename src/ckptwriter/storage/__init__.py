"""Backends that make a checkpoint durable. One module per backend owns all atomicity."""

from __future__ import annotations

import os

from .base import CommitOutcome, MemoryState, Storage
from .local import LocalStorage

__all__ = ["CommitOutcome", "LocalStorage", "MemoryState", "Storage", "open_storage"]


def open_storage(location: str | os.PathLike[str], *, fsync: bool = True) -> Storage:
    """The backend for a checkpoints location: a local path or an fsspec URL."""
    loc = os.fspath(location)
    if "://" in loc and not loc.startswith("file://"):
        from ..errors import ConfigError

        raise ConfigError(f"remote checkpoint_dir {loc!r} is not supported yet")
    if loc.startswith("file://"):
        loc = loc[len("file://") :]
    return LocalStorage(loc, fsync=fsync)
