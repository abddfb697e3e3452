"""Backends that make a checkpoint durable. One module per backend owns all atomicity."""

from __future__ import annotations

import os
from typing import Any

from .base import CommitOutcome, MemoryState, Storage
from .local import LocalStorage

__all__ = [
    "CommitOutcome", "LocalStorage", "MemoryState", "Storage", "is_local", "open_storage",
]


def is_local(location: str | os.PathLike[str]) -> bool:
    """True for a plain path or a ``file://`` URL: what :class:`LocalStorage` handles."""
    loc = os.fspath(location)
    return loc.startswith("file://") or "://" not in loc


def open_storage(
    location: str | os.PathLike[str], *, fsync: bool = True, **storage_options: Any
) -> Storage:
    """The backend for a checkpoints location: a local path or an fsspec URL.

    ``file://`` URLs and plain paths get :class:`LocalStorage`; any other URL
    (``s3://``, ``gs://``, ``memory://``...) gets
    :class:`~ckptwriter.storage.remote.RemoteStorage`, with ``storage_options`` passed to
    fsspec (``fsync`` does not apply there: a completed upload is durable).

    Raises:
        ConfigError: no fsspec implementation is installed for the URL's scheme.
    """
    loc = os.fspath(location)
    if loc.startswith("file://"):
        return LocalStorage(loc[len("file://") :], fsync=fsync)
    if "://" in loc:
        from .remote import RemoteStorage

        return RemoteStorage(loc, **storage_options)
    return LocalStorage(loc, fsync=fsync)
