"""What a re-commit on object storage compares against: the committed checkpoint's files.

A committed checkpoint is replaced there only by one with byte-identical files (see
:mod:`ckptwriter.storage.remote`): these read what its marker promises and whether the
objects still hold it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import layout
from .objects import ObjectStore

__all__ = ["Existing", "manifest_files", "read_existing"]


@dataclass(frozen=True, slots=True)
class Existing:
    """The committed checkpoint a new one of the same name would replace."""

    # The marker's tag: the new marker replaces exactly this one.
    tag: str
    # name -> (bytes, sha256) from its marker; None if it is not whole (readers cannot
    # load it, so overwriting its objects takes nothing from them).
    files: dict[str, tuple[int, str]] | None


def manifest_files(marker: bytes) -> dict[str, tuple[int, str]] | None:
    """name -> (bytes, sha256) of the files a ``runtime.json`` lists; None if unreadable."""
    try:
        files = json.loads(marker)["files"]
        return {str(n): (int(d["bytes"]), str(d["sha256"])) for n, d in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def read_existing(store: ObjectStore, prefix: str) -> Existing | None:
    """The committed checkpoint under ``prefix``; None if it has no marker.

    Raises:
        OSError: the store failed (the caller wraps it).
    """
    try:
        marker, tag = store.read_tagged(f"{prefix}/{layout.RUNTIME_JSON}")
    except FileNotFoundError:
        return None
    files = manifest_files(marker)
    if files is not None:
        sizes = store.sizes(prefix)
        if any(sizes.get(n) != nbytes for n, (nbytes, _) in files.items()):
            files = None
    return Existing(tag, files)
