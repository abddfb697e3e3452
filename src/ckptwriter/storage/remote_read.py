"""Find, verify and load checkpoints on object storage (fsspec URLs).

The rules are those of :mod:`ckptwriter.resume` for local disk, with one difference the
protocol imposes: a prefix without ``runtime.json`` (the commit marker, written last)
does not exist for readers, so it is neither listed nor resumed from. ``latest.json`` is
the only pointer (object stores have no symlinks). The public functions of ``resume``
dispatch here when they are given a URL.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path, PosixPath
from typing import TypeVar

from pydantic import ValidationError

from .. import layout, resume
from ..errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    UnsafePathError,
)
from ..manifest import LatestPointer, RuntimeManifest

# resume imports this module lazily (inside its functions), so no import cycle.
from ..resume import CheckpointFallbackWarning, CheckpointInfo, LoadedCheckpoint
from .objects import ObjectStore, open_store, store_error

__all__ = [
    "URLPath",
    "as_path",
    "checkpoints_dirs",
    "is_url",
    "latest_name",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "scan_store",
    "tree_size",
    "verify_checkpoint",
]

_T = TypeVar("_T")
# Tries to load while latest.json keeps moving (a writer retiring what we resolved).
_POINTER_RETRIES = 3
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")


class URLPath(PosixPath):
    """A checkpoint on object storage, typed as a ``Path`` so results keep one type.

    ``str()`` and ``os.fspath()`` give the URL back (``s3://bucket/run/ep_000100``), so it
    can be passed to every function of :mod:`ckptwriter.resume`; ``.name``, ``.parent``
    and ``/`` work. Methods that touch the local filesystem (``is_dir()``, ``open()``...)
    do not apply to it.
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

    def exists(self, *, follow_symlinks: bool = True) -> bool:
        """True if an object or a non-empty prefix is at this URL."""
        store, path = open_store(str(self))
        return store.size(path) is not None or bool(store.ls_names(path))

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        """True if objects exist under this URL as a prefix."""
        store, path = open_store(str(self))
        return bool(store.ls_names(path)) and store.size(path) is None

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        """True if one object is at this URL."""
        store, path = open_store(str(self))
        return store.size(path) is not None


def as_path(location: str | os.PathLike[str]) -> Path:
    """A local path as ``Path``, ``file://`` as its local ``Path``, other URLs as URLPath."""
    loc = os.fspath(location)
    if (local := _local_of(loc)) is not None:
        return Path(local)
    return URLPath(loc) if is_url(loc) else Path(loc)


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL (``s3://``, ``memory://``...), False for a local path."""
    return "://" in os.fspath(path)


def _local_of(url: str) -> str | None:
    return url[len("file://"):] if url.startswith("file://") else None


class _Reader:
    """One store and the reader rules, so every call on a URL shares a filesystem."""

    def __init__(self, store: ObjectStore, root: str, shown: str) -> None:
        self.store, self.root, self.shown = store, root, shown

    @classmethod
    def from_url(cls, url: str) -> _Reader:
        """A reader of ``url``; a missing bucket or bad credentials fail here, clearly."""
        store, root = open_store(url)
        reader = cls(store, root, url)
        reader.guard("opening", lambda: store.check_root(root))
        return reader

    def guard(self, action: str, fn: Callable[[], _T]) -> _T:
        """Run a store operation; store failures become StorageError naming the URL."""
        try:
            return fn()
        except CheckpointError:
            raise
        except Exception as exc:
            raise store_error(exc, action, self.shown) from exc

    def path(self, p: str) -> URLPath:
        return URLPath(self.store.url(p))

    # -- one checkpoint ----------------------------------------------------------------

    def parse_runtime(self, ckpt: str, data: bytes) -> RuntimeManifest:
        from ..resume import runtime_from_bytes

        return runtime_from_bytes(self.path(ckpt), data)

    def read_marker(self, ckpt: str) -> bytes | None:
        try:
            return self.store.cat(f"{ckpt}/{layout.RUNTIME_JSON}")
        except FileNotFoundError:
            return None

    def quick_check(
        self, ckpt: str, marker: bytes, sizes: dict[str, int]
    ) -> tuple[RuntimeManifest, int]:
        """runtime.json valid and every file present with its recorded size."""
        rt = self.parse_runtime(ckpt, marker)
        total = 0
        for name, digest in rt.files.items():
            size = sizes.get(f"{ckpt}/{name}")
            if size is None:
                raise CheckpointCorruptError(self.path(ckpt), name, "missing")
            if size != digest.bytes:
                raise CheckpointCorruptError(
                    self.path(ckpt), name,
                    f"size {size} bytes, expected {digest.bytes} (truncated?)",
                )
            total += size
        return rt, total

    def verify(self, ckpt: str) -> RuntimeManifest:
        marker = self.read_marker(ckpt)
        if marker is None:
            raise CheckpointNotFoundError(
                self.store.url(ckpt), self.nearby(ckpt),
                hint="No committed checkpoint (runtime.json) under this prefix.",
            )
        rt, _ = self.quick_check(ckpt, marker, self.store.find(ckpt))
        for name, digest in rt.files.items():
            sha = hashlib.sha256()
            for chunk in self.store.read_chunks(f"{ckpt}/{name}"):
                sha.update(chunk)
            if sha.hexdigest() != digest.sha256:
                raise CheckpointCorruptError(
                    self.path(ckpt), name, "sha256 does not match runtime.json"
                )
        return rt

    # -- a checkpoints prefix ----------------------------------------------------------

    def scan(self, root: str) -> list[CheckpointInfo]:
        return scan_store(self.store, root)

    def pointer_target(self, root: str) -> tuple[str | None, str]:
        try:
            data = self.store.cat(f"{root}/{layout.LATEST_JSON}")
        except FileNotFoundError:
            return None, "latest.json is missing"
        try:
            ptr = LatestPointer.model_validate_json(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            if err["loc"] and err["loc"][0] == "checkpoint":
                raise UnsafePathError(
                    self.path(root), layout.LATEST_JSON,
                    "names a checkpoint outside the checkpoints directory; refusing to follow it",
                ) from None
            return None, f"{layout.LATEST_JSON} is invalid"
        return ptr.checkpoint, ""

    def resolve_latest(self, root: str) -> str:
        target, why = self.pointer_target(root)
        if target is not None:
            try:
                self.verify(f"{root}/{target}")
                return f"{root}/{target}"
            except CheckpointNotFoundError:
                why = f"latest points at {target}, which does not exist"
            except CheckpointCorruptError as exc:
                why = f"latest points at {target}, which is broken ({exc.file}: {exc.problem})"
        for info in reversed(self.scan(root)):
            if not info.complete:
                continue
            try:
                self.verify(f"{root}/{info.name}")
            except CheckpointCorruptError:
                continue
            warnings.warn(
                f"{why}; falling back to the newest valid checkpoint {info.path}",
                CheckpointFallbackWarning,
                stacklevel=6,
            )
            return f"{root}/{info.name}"
        raise CheckpointNotFoundError(
            self.shown, self.nearby(root),
            hint=f"No valid checkpoint in {self.store.url(root)} ({why}).",
        )

    def resolve(self) -> str:
        """The store path of the one verified checkpoint the URL names."""
        p = self.root
        name = posixpath.basename(p)
        if name in (layout.LATEST_LINK, layout.LATEST_JSON):
            parent = posixpath.dirname(p)
            if _is_checkpoints_dir(self.store.ls_names(parent)):
                return self.resolve_latest(parent)
        children = self.store.ls_names(p)
        if children:
            if layout.RUNTIME_JSON in children or layout.parse_checkpoint_name(name) is not None:
                self.verify(p)
                return p
            if _is_checkpoints_dir(children):
                return self.resolve_latest(p)
            if "checkpoints" in children:
                return self.resolve_latest(f"{p}/checkpoints")
            for run in sorted((c for c in children if layout.RUN_DIR_RE.match(c)), reverse=True):
                ckpts = f"{p}/{run}/checkpoints"
                if any(i.complete for i in self.scan(ckpts)):
                    return self.resolve_latest(ckpts)
        raise CheckpointNotFoundError(self.shown, self.nearby(p))

    def nearby(self, p: str, limit: int = 10) -> list[str]:
        """Committed checkpoints close to a prefix that does not resolve, newest first."""
        anc = p
        while anc not in {"", "/"} and not self.store.ls_names(anc):
            parent = posixpath.dirname(anc)
            # Never climb to a bucket's root: a shared bucket may hold millions of
            # objects, and listing them all for an error message is not worth it.
            if "/" not in parent.strip("/"):
                return []
            anc = parent
        for pattern in ("ep_*", "*/ep_*", "*/*/ep_*"):
            found = self.store.glob(f"{anc}/{pattern}/{layout.RUNTIME_JSON}")
            if found:
                ckpts = sorted((posixpath.dirname(f) for f in found), reverse=True)
                return [self.store.url(c) for c in ckpts[:limit]]
        return []

    def load_resolved(self, ckpt: str, expected_memory_type: str | None) -> LoadedCheckpoint:
        ckpt_path = self.path(ckpt)
        marker = self.read_marker(ckpt)
        if marker is None:
            raise CheckpointNotFoundError(str(ckpt_path), self.nearby(ckpt))
        rt = self.parse_runtime(ckpt, marker)
        paths = [f"{ckpt}/{n}" for n in rt.files]
        try:
            raw = self.store.cat_many(paths)
        except FileNotFoundError as exc:
            missing = posixpath.basename(str(exc.filename or "")) or "a file"
            raise CheckpointCorruptError(ckpt_path, missing, "missing") from None
        from ..resume import checkpoint_from_files

        by_name = {name: raw[f"{ckpt}/{name}"] for name in rt.files}
        return checkpoint_from_files(ckpt_path, rt, by_name, expected_memory_type)


def _is_checkpoints_dir(children: list[str]) -> bool:
    return layout.LATEST_JSON in children or any(
        layout.parse_checkpoint_name(c) is not None for c in children
    )


def scan_store(store: ObjectStore, root: str) -> list[CheckpointInfo]:
    """Committed checkpoints under a checkpoints prefix, oldest first, with quick checks.

    One recursive listing gives every size; only ``runtime.json`` markers are read.
    Prefixes without a marker (uncommitted) are left out.
    """
    sizes = store.find(root)
    names: set[str] = set()
    prefix = root.rstrip("/") + "/"
    for p in sizes:
        if not p.startswith(prefix):
            continue
        head, sep, _ = p[len(prefix):].partition("/")
        if sep and layout.parse_checkpoint_name(head) is not None:
            names.add(head)
    markers = [f"{root}/{n}/{layout.RUNTIME_JSON}" for n in names
               if f"{root}/{n}/{layout.RUNTIME_JSON}" in sizes]
    blobs = store.cat_many(markers)
    reader = _Reader(store, root, store.url(root))
    out: list[CheckpointInfo] = []
    for name in names:
        ckpt = f"{root}/{name}"
        ep = layout.parse_checkpoint_name(name)
        assert ep is not None
        marker = blobs.get(f"{ckpt}/{layout.RUNTIME_JSON}")
        if marker is None:
            continue
        path = reader.path(ckpt)
        try:
            rt, size = reader.quick_check(ckpt, marker, sizes)
        except CheckpointCorruptError as exc:
            out.append(CheckpointInfo(name, path, ep, False, problem=f"{exc.file}: {exc.problem}"))
            continue
        out.append(CheckpointInfo(name, path, ep, True, runtime=rt, size_bytes=size))
    out.sort(key=lambda i: i.episode_index)
    return out


# -- the entry points resume.py dispatches to -----------------------------------------


def resolve_checkpoint(url: str) -> Path:
    """:func:`ckptwriter.resume.resolve_checkpoint` for a URL."""
    if (local := _local_of(url)) is not None:
        return resume.resolve_checkpoint(local)
    r = _Reader.from_url(url)
    return r.path(r.guard("resolving", r.resolve))


def verify_checkpoint(url: str) -> RuntimeManifest:
    """:func:`ckptwriter.resume.verify_checkpoint` for a URL."""
    if (local := _local_of(url)) is not None:
        return resume.verify_checkpoint(local)
    r = _Reader.from_url(url)
    return r.guard("verifying", lambda: r.verify(r.root))


def list_checkpoints(url: str) -> list[CheckpointInfo]:
    """:func:`ckptwriter.resume.list_checkpoints` for a URL (committed checkpoints only)."""
    if (local := _local_of(url)) is not None:
        return resume.scan_checkpoints(local)
    r = _Reader.from_url(url)
    return r.guard("listing", lambda: r.scan(r.root))


def load_checkpoint(url: str, expected_memory_type: str | None = None) -> LoadedCheckpoint:
    """:func:`ckptwriter.resume.load_checkpoint` for a URL."""
    if (local := _local_of(url)) is not None:
        return resume.load_checkpoint(local, expected_memory_type=expected_memory_type)
    r = _Reader.from_url(url)
    for _ in range(_POINTER_RETRIES - 1):
        ckpt = r.guard("resolving", r.resolve)
        try:
            return r.guard("loading", partial(r.load_resolved, ckpt, expected_memory_type))
        except CheckpointCorruptError:
            # Resolved through latest.json while a writer retired that checkpoint:
            # read the one latest.json names now, if it moved.
            if r.guard("resolving", r.resolve) == ckpt:
                raise
    ckpt = r.guard("resolving", r.resolve)
    return r.guard("loading", partial(r.load_resolved, ckpt, expected_memory_type))


# -- what the inspection commands (ls, verify, du) need -------------------------------


def checkpoints_dirs(url: str) -> list[URLPath]:
    """Checkpoints prefixes at or under ``url``: itself, its parent (a checkpoint URL),
    ``<url>/checkpoints``, or the ``checkpoints`` of the run prefixes under it.

    Raises:
        CheckpointNotFoundError: none there.
        StorageError: the store cannot be read (bucket, credentials).
    """
    r = _Reader.from_url(url)

    def find() -> list[str]:
        children = r.store.ls_names(r.root)
        if layout.RUNTIME_JSON in children or layout.parse_checkpoint_name(
            posixpath.basename(r.root)
        ) is not None:
            return [posixpath.dirname(r.root)]
        if _is_checkpoints_dir(children):
            return [r.root]
        found = []
        runs = [r.root] if "checkpoints" in children else [
            f"{r.root}/{c}" for c in sorted(children)
        ]
        for run in runs:
            sub = r.store.ls_names(run) if run != r.root else children
            if "checkpoints" in sub and _is_checkpoints_dir(
                r.store.ls_names(f"{run}/checkpoints")
            ):
                found.append(f"{run}/checkpoints")
        return found

    dirs = r.guard("listing", find)
    if not dirs:
        raise CheckpointNotFoundError(
            url, r.nearby(r.root),
            hint="Expected a checkpoints prefix, a run prefix or a prefix of runs.",
        )
    return [r.path(d) for d in dirs]


def latest_name(url: str) -> str | None:
    """The checkpoint name ``latest.json`` under a checkpoints prefix names, if valid."""
    r = _Reader.from_url(url)
    try:
        target, _ = r.guard("reading latest.json in", lambda: r.pointer_target(r.root))
    except UnsafePathError:
        return None
    return target


def tree_size(url: str) -> int:
    """Bytes of every object under a prefix (one listing)."""
    r = _Reader.from_url(url)
    return sum(r.guard("listing", lambda: r.store.find(r.root)).values())
