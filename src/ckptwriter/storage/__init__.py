"""Storage backends: the primitives that make a checkpoint durable, one module each.

``local`` (POSIX directories) and ``remote`` (object storage through fsspec) implement
the protocols of ``base``; ``location`` is the one place a path or URL is interpreted.
"""

from __future__ import annotations

import os
from typing import Any

from .base import Backend, FileSpec, PendingCheckpoint, ReadStore, ReuseToken, StoreEntry
from .local import LocalStorage, LocalStore
from .location import Location, open_store, parse_location
from .remote import RemoteStorage

__all__ = [
    "Backend",
    "FileSpec",
    "LocalStorage",
    "LocalStore",
    "Location",
    "PendingCheckpoint",
    "ReadStore",
    "RemoteStorage",
    "ReuseToken",
    "StoreEntry",
    "open_backend",
    "open_store",
    "parse_location",
]


def open_backend(
    location: str | os.PathLike[str], *, fsync: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Backend:
    """The backend a writer commits through for a checkpoints location.

    ``fsync`` applies to local disks (a completed upload is already durable);
    ``storage_options`` go to fsspec for URLs.

    Raises:
        ConfigError: no fsspec implementation is installed for the URL's scheme.
    """
    loc = parse_location(location)
    if loc.is_local:
        return LocalStorage(loc.path, fsync=fsync)
    return RemoteStorage(loc.path, **(storage_options or {}))
