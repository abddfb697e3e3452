"""The one place a checkpoint location (a path or a URL string) is interpreted.

A plain path and a ``file://`` URL are local (POSIX); any other ``scheme://`` is object
storage reached through fsspec (``s3://``, ``gs://``, ``memory://``...). Everything else
in ckptwriter asks this module instead of looking at the string.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec

from ..errors import ConfigError
from .base import ReadStore
from .local import LocalStore
from .objects import ObjectStore
from .s3 import S3ObjectStore

__all__ = ["Location", "open_object_store", "open_store", "parse_location"]

_SEP = "://"
# Stores that live inside one process: a writer process would write into its own copy.
_IN_PROCESS_SCHEMES = frozenset({"memory"})


@dataclass(frozen=True, slots=True)
class Location:
    """A parsed checkpoint location.

    Attributes:
        text: the location as given.
        is_local: a local filesystem path (plain or ``file://``).
        path: for a local location, the filesystem path (``file://`` removed); for a URL,
            the URL itself.
        scheme: the URL scheme (``s3``, ``memory``...), ``None`` for a local location.
    """

    text: str
    is_local: bool
    path: str
    scheme: str | None

    @property
    def shared_across_processes(self) -> bool:
        """True if another process opening it sees the same checkpoints."""
        return self.scheme not in _IN_PROCESS_SCHEMES

    def absolute(self) -> Location:
        """Local paths fixed against the current directory now (a later chdir must not
        send checkpoints elsewhere); URLs unchanged."""
        if not self.is_local:
            return self
        return Location(self.text, True, os.path.abspath(self.path), None)


def parse_location(location: str | os.PathLike[str]) -> Location:
    """Classify a path or URL."""
    text = os.fspath(location)
    if text.startswith("file" + _SEP):
        return Location(text, True, text[len("file" + _SEP):], None)
    if _SEP in text:
        return Location(text, False, text, urlsplit(text).scheme)
    return Location(text, True, text, None)


def open_store(
    location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> tuple[ReadStore, str]:
    """The read primitives for a location, and its store path.

    Raises:
        ConfigError: no fsspec implementation is installed for the URL's scheme.
    """
    loc = parse_location(location)
    if loc.is_local:
        return LocalStore(), loc.path
    return open_object_store(loc.path, storage_options)


def open_object_store(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[ObjectStore, str]:
    """The store and root path of an fsspec URL (``s3://bucket/prefix``, ``memory://x``).

    Raises:
        ConfigError: the URL's scheme has no fsspec implementation installed.
    """
    scheme = urlsplit(url).scheme
    options = dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        extra = " (pip install 'ckptwriter[s3]')" if scheme in {"s3", "s3a"} else ""
        raise ConfigError(
            f"cannot open {url!r}: {exc}. Install the fsspec backend for {scheme}://{extra} "
            "or use a local checkpoint_dir"
        ) from exc
    # "" for a store's root (memory://), so children join as "/name", never "//name".
    path = str(path).rstrip("/")
    cls = S3ObjectStore if type(fs).__name__ == "S3FileSystem" else ObjectStore
    return cls(fs, scheme), path
