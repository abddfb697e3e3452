"""A local checkpoint being written: its temp directory, its files, their fsyncs.

Every file is created in ``.tmp-ep_N-<random>/`` (never over an existing one, never
through a symlink) or hard-linked there from the previous checkpoint, and handed to an
:class:`~ckptwriter.storage.local_background.FsyncBatch` as soon as it is written. At
:meth:`LocalPending.finalize`, ``runtime.json`` and the next ``latest.json`` join the
batch with the temp directory itself; the directory is renamed into place only once
every one of those flushes succeeded (storage/local.py: the rest of the protocol).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from .. import layout
from ..errors import StorageError
from .base import FileSpec, ReuseToken
from .local_background import FsyncBatch
from .local_prepare import Ahead, PreparedPrefix, discard
from .local_reuse import OwnChanges, link_checked, token_ident
from .posix_io import (
    CREATE,
    DIRECT_MIN_BYTES,
    FILE_MODE,
    Writeback,
    copy_prefix,
    os_error,
    refill_in_background,
    write_all,
    write_uncached,
)

__all__ = ["CREATE", "FILE_MODE", "LocalPending"]


class _Storage(Protocol):
    """What a pending checkpoint uses of its :class:`~ckptwriter.storage.LocalStorage`."""

    path: Path
    fsync: bool
    _own: OwnChanges

    @property
    def _fd(self) -> int: ...
    def _step(self, name: str) -> None: ...
    def _relative(self, token: ReuseToken) -> str | None: ...
    def open_reused(self, token: ReuseToken) -> int | None: ...
    def _batch(self) -> FsyncBatch: ...
    def _create(self, dir_fd: int, name: str, data: bytes,
                batch: FsyncBatch | None = None) -> None: ...
    def _stage(self, name: str, pointer_json: bytes, batch: FsyncBatch) -> None: ...
    def _install(self, tmp: str, name: str) -> None: ...
    def _discard(self, name: str) -> None: ...
    def _unstage(self) -> None: ...
    _ahead: Ahead
    _dir_fd: int | None


class LocalPending:
    """A checkpoint being written into its temp directory (held open as ``tmp_fd``)."""

    def __init__(self, storage: _Storage, name: str, tmp: str, tmp_fd: int) -> None:
        self.name = name
        self._s = storage
        self._tmp = tmp
        self._tmp_fd: int | None = tmp_fd
        self._final = storage.path / name
        self._syncs = storage._batch()
        # Files written past the page cache, read back into it once this commit stands.
        self._refill: list[int] = []
        # What copying the memory's prefix ahead took, when this commit used that copy.
        self.prepared_seconds = 0.0

    @property
    def _fd(self) -> int:
        if self._tmp_fd is None:
            raise StorageError(f"checkpoint {self._final} is already finalized or discarded")
        return self._tmp_fd

    def write(self, files: Sequence[FileSpec]) -> dict[str, ReuseToken]:
        ahead = self._s._ahead
        if ahead.next is not None and not any(
                s.reuse == ahead.next.token and s.data for s in files):
            # A copy this commit does not extend: its space is given back first.
            ahead.drop(self._s._dir_fd)
        tokens: dict[str, ReuseToken] = {}
        try:
            for spec in files:
                tokens[spec.name] = self._write_one(spec)
        except OSError as exc:
            raise os_error(exc, "writing checkpoint", self._final) from exc
        return tokens

    def _write_one(self, spec: FileSpec) -> ReuseToken:
        src = None
        if spec.reuse is not None:
            src = self._s.open_reused(spec.reuse)
            if src is None:
                raise OSError(errno.ESTALE, "the previous file changed on disk", spec.reuse.path)
        try:
            rel = self._s._relative(spec.reuse) if spec.reuse is not None else None
            if src is not None and rel is not None and not spec.data and \
                    link_checked(self._s._fd, rel, src, self._fd, spec.name, self._s._own):
                # No byte written: the tmp directory's fsync makes the new name durable.
                st = os.stat(spec.name, dir_fd=self._fd, follow_symlinks=False)
            else:
                st = self._create_one(spec, src)
        finally:
            if src is not None:
                os.close(src)
        # Renaming the directory keeps each file's inode, mtime and ctime: the token
        # holds for the final path. (Stat taken after our own link: its ctime.)
        return ReuseToken(str(self._final / spec.name), st.st_size, token_ident(st))

    def _create_one(self, spec: FileSpec, src: int | None) -> os.stat_result:
        ready = self._take_prepared(spec)
        fd = ready.fd if ready is not None else \
            os.open(spec.name, CREATE, FILE_MODE, dir_fd=self._fd)
        try:
            wb = Writeback(fd, spec.nbytes) if self._s.fsync else None
            if ready is not None:
                # The prefix was copied ahead (local_prepare): only the delta is written.
                if wb is not None:
                    wb = Writeback(fd, spec.nbytes, offset=ready.token.nbytes)
            elif src is not None and spec.reuse is not None:
                copy_prefix(src, fd, spec.reuse.nbytes, spec.reuse.path, wb)
                if wb is not None and hasattr(os, "posix_fadvise"):
                    # The previous file is durable and the next copy reads this one:
                    # its pages go back now, for this file's to reuse. Page cache the
                    # writer never needs again would otherwise grow with every commit
                    # kept, and new pages cost more than reused ones (10x in a VM).
                    # Only a hint: where it is refused, nothing is lost.
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(src, 0, spec.reuse.nbytes, os.POSIX_FADV_DONTNEED)
            # Past the page cache only when durable writes are asked for: without
            # fsync a write returns once in memory, and a direct one would wait for the
            # disk.
            if wb is not None and src is None and spec.nbytes >= DIRECT_MIN_BYTES \
                    and getattr(spec.data, "page_aligned", False):
                write_uncached(fd, spec.data, wb)
                with contextlib.suppress(OSError):  # only for a hint (EMFILE: none)
                    self._refill.append(os.dup(fd))
            else:
                write_all(fd, spec.data, wb)
            st = os.fstat(fd)  # fsync moves neither mtime nor ctime
        except BaseException:
            os.close(fd)
            raise
        self._syncs.add(fd)
        return st

    def _take_prepared(self, spec: FileSpec) -> PreparedPrefix | None:
        """The prefix of ``spec`` copied ahead, moved into the temp directory, if any."""
        if spec.reuse is None or not spec.data:
            return None
        ready = self._s._ahead.take(spec.reuse)
        if ready is None:
            return None
        try:
            # A name in our own new directory: nothing is there to replace.
            os.rename(ready.name, spec.name, src_dir_fd=self._s._fd, dst_dir_fd=self._fd)
        except OSError:
            discard(self._s._fd, ready.name, ready.fd)
            return None  # copied again, as without it
        self.prepared_seconds = ready.seconds
        return ready

    def finalize(self, marker: bytes, *, latest: bytes | None = None) -> str:
        s = self._s
        installed = False
        try:
            s._create(self._fd, layout.RUNTIME_JSON, marker, self._syncs)
            if latest is not None:
                s._stage(self.name, latest, self._syncs)
            s._step("runtime_written")
            self._syncs.add(os.dup(self._fd))
            self._syncs.wait()
            s._step("tmp_dir_synced")
            s._install(self._tmp, self.name)
            installed = True
        except OSError as exc:
            s._unstage()
            raise os_error(exc, "writing checkpoint", self._final) from exc
        except BaseException:
            s._unstage()
            raise
        finally:
            refill: list[int] = []
            if installed:
                refill, self._refill = self._refill, []
            try:
                self._close()
            finally:
                # The checkpoint stands: what follows is a hint, which never fails it.
                refill_in_background(refill)
        return str(self._final)

    def _close(self) -> None:
        # A prefix copied ahead for another file than this commit extended is stale.
        self._s._ahead.drop(self._s._dir_fd)
        refill, self._refill = self._refill, []
        for kept in refill:
            os.close(kept)
        self._syncs.abandon()
        fd, self._tmp_fd = self._tmp_fd, None
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        # After a swap the temp name holds the old copy, which goes too: ep_N is whole.
        self._close()
        self._s._unstage()
        self._s._discard(self._tmp)
