"""``URLPath``: a checkpoint on object storage, typed as a ``Path`` so results keep one type."""

from __future__ import annotations

import re
from pathlib import PosixPath

import fsspec

__all__ = ["URLPath"]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")


class URLPath(PosixPath):
    """A checkpoint on object storage, typed as a ``Path`` so results keep one type.

    ``str()`` and ``os.fspath()`` give the URL back (``s3://bucket/run/ep_000100``), so it
    can be passed to every reader function; ``.name``, ``.parent`` and ``/`` work.
    ``exists()``, ``is_dir()`` and ``is_file()`` ask the store; methods that only make
    sense on a local filesystem (``open()``...) do not apply to it.
    """

    def __str__(self) -> str:
        return _SCHEME_RE.sub(r"\1://", super().__str__(), count=1)

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"URLPath({str(self)!r})"

    def resolve(self, strict: bool = False) -> URLPath:
        """A URL is already absolute; resolving it against the local cwd would break it."""
        return self

    def absolute(self) -> URLPath:
        """A URL is already absolute."""
        return self

    def _fs(self) -> tuple[object, str]:
        fs, path = fsspec.core.url_to_fs(str(self))
        fs.invalidate_cache(path)
        return fs, str(path)

    def exists(self, *, follow_symlinks: bool = True) -> bool:
        """True if an object or a non-empty prefix is at this URL."""
        fs, path = self._fs()
        return bool(fs.exists(path))  # type: ignore[attr-defined]

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        """True if objects exist under this URL as a prefix."""
        fs, path = self._fs()
        return bool(fs.isdir(path))  # type: ignore[attr-defined]

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        """True if one object is at this URL."""
        fs, path = self._fs()
        return bool(fs.isfile(path))  # type: ignore[attr-defined]
